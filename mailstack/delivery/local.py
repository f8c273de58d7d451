# -*- test-case-name: tests.delivery.test_local -*-
"""Local delivery: copy a queued message into each local recipient's Maildir.

The queue manager calls ``deliver`` right after the intake's kick and on every
retry.  Each recipient gets its own thread-pool call, so a message for many
local users is written in parallel and one slow or full mailbox does not hold
up the others.  ``Return-Path:`` (RFC 5321 section 4.4: added at final
delivery, from the reverse-path) and ``Delivered-To:`` (the final mailbox after
alias expansion, which lets a user see why a copy arrived and lets loops be
detected) are prepended; the queued bytes follow unchanged.

The message is streamed from ``queue/msg/<id>`` in 64 KiB chunks, never read
whole.  Delivery is at-least-once: if the process dies after a Maildir write
and before the manager saves the recipient as delivered, the retry writes a
second copy, which beats losing one.

Direct delivery (the fast path of the intake)
---------------------------------------------
For a new message whose recipients are all local, the intake does not queue
it at all: ``deliver_direct`` (blocking, one thread call per message) writes
and fsyncs each recipient's copy into its Maildir's ``tmp/``, then renames
the copies into ``new/`` and fsyncs each folder, an fsync shared with the
other threads publishing into that folder at the same time
(``storage.dirsync``).  The intake sends the 250 after that, and queues
whatever could not be delivered this way.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.address import AddressError
from mailstack.delivery import replies as OR
from mailstack.errors import Reply
from mailstack.interfaces import IDeliveryAgent, IDirectDelivery, IMaildirStore, IQueueStore
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.storage import fsutil
from mailstack.storage.maildir import Pending


def delivery_prefix(sender: str, address: str) -> bytes:
    """The header lines written in front of the queued message for ``address``."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n".encode()


@implementer(IDeliveryAgent, IDirectDelivery)
class LocalAgent:
    """Delivers local recipients of queue entries into Maildirs (IMaildirStore)."""

    log = Logger()

    # Each copy is written in a thread straight from the queue file; the
    # manager hands over the bytes only when they are inside the envelope.
    takes_message = False

    def __init__(self, maildirs: IMaildirStore, store: IQueueStore, run_blocking: Callable[..., Deferred]) -> None:
        self._maildirs = maildirs
        self._store = store
        self._run_blocking = run_blocking

    def deliver(self, entry: QueueEntry, recipients: list[RecipientState], message: bytes | None = None) -> Deferred:
        """Deferred of ``{recipient.address: Reply}``; never errbacks.

        ``recipients`` are local ones of ``entry``; the manager records the
        replies.  ``message``: the bytes, when they are stored inside the
        envelope (there is no message file then); else the copies are
        written from ``message_path``.
        """
        source: bytes | str = message if message is not None else self._store.message_path(entry.id)
        pending = [self._deliver_one(entry, rcpt, source) for rcpt in recipients]
        return gatherResults(pending).addCallback(dict)

    def _deliver_one(self, entry: QueueEntry, rcpt: RecipientState, source: bytes | str) -> Deferred:
        prefix = delivery_prefix(entry.sender, rcpt.address)
        d = self._run_blocking(self._maildirs.deliver, rcpt.address, source, prefix)
        d.addCallbacks(lambda name: OR.DELIVERED, self._classify, errbackArgs=(entry, rcpt))
        d.addCallback(self._logged, entry, rcpt)
        return d

    def _classify(self, failure: Failure, entry: QueueEntry, rcpt: RecipientState) -> Reply:
        """Turn a delivery error into the Reply the manager acts on (4xx: retry)."""
        if failure.check(AddressError):
            return OR.BAD_MAILBOX
        if failure.check(OSError):
            self.log.error(
                "maildir write for {queue_id} to {recipient} failed: {error}",
                queue_id=entry.id,
                recipient=rcpt.address,
                error=str(failure.value),
            )
            # RFC 3463: 4.2.2 mailbox full is retried, not bounced.
            error = failure.value
            return OR.MAILBOX_FULL if error is not None and fsutil.is_disk_full(error) else OR.LOCAL_ERROR
        self.log.failure(
            "delivering {queue_id} to {recipient}", failure=failure, queue_id=entry.id, recipient=rcpt.address
        )
        return OR.LOCAL_ERROR

    def _logged(self, reply: Reply, entry: QueueEntry, rcpt: RecipientState) -> tuple[str, Reply]:
        """One event per delivery attempt: queue id, recipient, result."""
        self.log.info(
            "local delivery of {queue_id} to {recipient}: {reply}",
            queue_id=entry.id,
            recipient=rcpt.address,
            reply=str(reply),
        )
        return rcpt.address, reply

    def close_idle(self) -> None:
        """Nothing to close: Maildir writes hold no connection."""

    def abort_all(self) -> None:
        """Nothing to abort: a Maildir write in a thread finishes (it is fsynced)."""

    # -- direct delivery (blocking; see the module doc) ------------------------

    def direct_ok(self, entry: QueueEntry) -> bool:
        """Whether ``entry`` may take the direct path: every recipient local and none
        asking for a success DSN (RFC 3461 NOTIFY=SUCCESS; the queue's bouncer sends those)."""
        return bool(entry.recipients) and all(r.local and "SUCCESS" not in r.notify for r in entry.recipients)

    def deliver_direct(self, entry: QueueEntry, source: bytes | str) -> list[BaseException | None]:
        """Every recipient's copy written, fsynced and moved into ``new/`` (its folder fsynced); blocking.

        ``source``: the message bytes, or the path of the file holding them.
        If any copy cannot be written, those written are dropped again and the
        error is raised: nothing was delivered and the caller queues the
        message whole.  Otherwise per recipient None (delivered) or the error
        that failed moving its copy into place (that copy is taken back).
        """
        pending: list[Pending] = []
        try:
            for r in entry.recipients:
                pending.append(self._maildirs.prepare(r.address, source, delivery_prefix(entry.sender, r.address)))
        except BaseException:
            for p in pending:
                self._maildirs.discard(p)
            raise
        return self._maildirs.publish(pending)
