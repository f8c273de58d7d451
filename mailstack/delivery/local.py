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

Inline delivery (the fast path of the intake)
---------------------------------------------
For a new message whose recipients are all local, the intake does not wait
for the manager: ``prepare_inline`` (blocking, in the same thread call that
prepares the queue commit) writes and fsyncs each recipient's copy into its
Maildir's ``tmp/``; once the queue commit is durable, ``publish_inline``
(blocking, one call per batch of messages) renames the copies into ``new/``
with one fsync per ``new/`` folder, and removes each fully delivered entry
from the queue without a directory fsync (a crash that undoes the removal
only causes a second delivery).  No copy is visible in ``new/`` before the
queue commit is durable, so a 250 never depends on a Maildir and a Maildir
never holds a message the client was refused.  Anything that fails on this
path falls back to the manager, which retries through ``deliver`` as usual;
recipients already delivered are saved as such first.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.address import AddressError
from mailstack.errors import Reply
from mailstack.interfaces import IDeliveryAgent
from mailstack.queue.entry import DELIVERED as STATUS_DELIVERED
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.queue.store import QueueStore
from mailstack.storage import fsutil
from mailstack.storage.maildir import CHUNK, MaildirStore, Pending

DELIVERED = Reply(250, "2.0.0", "Delivered")
# RFC 3463: 4.3.0 other mail system problem; 4.2.2 mailbox full (retried, not bounced).
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in delivery")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")
BAD_MAILBOX = Reply(550, "5.1.3", "Bad destination mailbox address")


def delivery_prefix(sender: str, address: str) -> bytes:
    """The header lines written in front of the queued message for ``address``."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n".encode("utf-8")


@implementer(IDeliveryAgent)
class LocalAgent:
    """Delivers local recipients of queue entries into a MaildirStore."""

    log = Logger()

    def __init__(self, maildirs: MaildirStore, store: QueueStore, run_blocking: Callable[..., Deferred]) -> None:
        self._maildirs = maildirs
        self._store = store
        self._run_blocking = run_blocking

    def deliver(self, entry: QueueEntry, recipients: list[RecipientState]) -> Deferred:
        """Deferred of ``{recipient.address: Reply}``; never errbacks.

        ``recipients`` are local ones of ``entry``; the manager records the replies.
        """
        source = self._store.message_path(entry.id)
        pending = [self._deliver_one(entry, rcpt, source) for rcpt in recipients]
        return gatherResults(pending).addCallback(dict)

    def _deliver_one(self, entry: QueueEntry, rcpt: RecipientState, source: str) -> Deferred:
        prefix = delivery_prefix(entry.sender, rcpt.address)
        d = self._run_blocking(self._maildirs.deliver, rcpt.address, source, prefix)
        d.addCallbacks(lambda name: DELIVERED, self._classify, errbackArgs=(entry, rcpt))
        d.addCallback(self._logged, entry, rcpt)
        return d

    def _classify(self, failure: Failure, entry: QueueEntry, rcpt: RecipientState) -> Reply:
        """Turn a delivery error into the Reply the manager acts on (4xx: retry)."""
        if failure.check(AddressError):
            return BAD_MAILBOX
        if failure.check(OSError):
            self.log.error(
                "maildir write for {queue_id} to {recipient} failed: {error}",
                queue_id=entry.id,
                recipient=rcpt.address,
                error=str(failure.value),
            )
            return MAILBOX_FULL if fsutil.is_disk_full(failure.value) else LOCAL_ERROR
        self.log.failure("delivering {queue_id} to {recipient}", failure=failure, queue_id=entry.id, recipient=rcpt.address)
        return LOCAL_ERROR

    def _logged(self, reply: Reply, entry: QueueEntry, rcpt: RecipientState) -> tuple[str, Reply]:
        """One event per delivery attempt: queue id, recipient, result."""
        self.log.info(
            "local delivery of {queue_id} to {recipient}: {reply}",
            queue_id=entry.id,
            recipient=rcpt.address,
            reply=str(reply),
        )
        return rcpt.address, reply

    # -- inline delivery (blocking; see the module doc) ------------------------

    def inline_ok(self, entry: QueueEntry) -> bool:
        """Whether ``entry`` may take the inline path: every recipient local."""
        return bool(entry.recipients) and all(r.local for r in entry.recipients)

    def prepare_inline(self, entry: QueueEntry, *sources: str) -> list[Pending] | None:
        """Write every recipient's copy of the message into its Maildir ``tmp/``, fsynced.

        Blocking.  ``sources`` are the paths the message may be found at, in
        order (``queue/tmp/<id>``, then ``queue/msg/<id>``: this runs beside the
        commit, which renames the one to the other).  None if any copy could not
        be written (those written are dropped again): the manager then delivers
        the message the usual way and reports the error.
        """
        pending: list[Pending] = []
        try:
            f = _open_first(sources)
            with f:
                for r in entry.recipients:
                    f.seek(0)
                    chunks = iter(lambda: f.read(CHUNK), b"")
                    pending.append(self._maildirs.prepare(r.address, chunks, delivery_prefix(entry.sender, r.address)))
        except Exception:
            for p in pending:
                self._maildirs.discard(p)
            return None
        return pending

    def discard_inline(self, pending: Pending) -> None:
        """Drop a copy written by ``prepare_inline`` (its queue commit failed)."""
        self._maildirs.discard(pending)

    def publish_inline(
        self, batch: list[tuple[QueueEntry, list[Pending]]], now: float
    ) -> list[tuple[list[BaseException | None], bool]]:
        """Deliver the prepared copies of committed entries; one fsync per ``new/``.

        Blocking.  Returns per entry the list of per-recipient results (None:
        delivered, or the error) and whether the queue is settled: a fully
        delivered entry is removed from the queue (no directory fsync); a
        partly delivered one is saved with those recipients marked delivered,
        so the manager's retry does not deliver them twice.  Not settled
        (a failure, or the queue update failed) means: kick the manager.
        """
        from mailstack.queue.manager import save_unless_deleted  # the manager's lock protocol

        flat = [p for _, pending in batch for p in pending]
        errors = self._maildirs.publish(flat)
        out: list[tuple[list[BaseException | None], bool]] = []
        i = 0
        for entry, pending in batch:
            mine = errors[i : i + len(pending)]
            i += len(pending)
            settled = False
            try:
                if not any(mine):
                    self._store.remove(entry.id, sync=False)
                    settled = True
                elif not all(mine):
                    reply = str(DELIVERED)
                    for r, error in zip(entry.recipients, mine):
                        if error is None:
                            r.status = STATUS_DELIVERED
                            r.last_reply = reply
                            r.history.append({"time": now, "host": "", "reply": reply})
                    save_unless_deleted(self._store, entry)
            except Exception:
                # The queue does not know what was delivered: the manager's
                # retry delivers those copies again (at-least-once).
                pass
            out.append((mine, settled))
        return out


def _open_first(paths: tuple[str, ...]) -> Any:
    """The first of ``paths`` that can be opened for reading (FileNotFoundError if none)."""
    for path in paths[:-1]:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            continue
    return open(paths[-1], "rb")
