# -*- test-case-name: tests.test_intake -*-
"""The only door for new mail: take a message and make it durable, once.

SMTP sessions and the DSN builder both call ``Intake.begin(envelope)``, write
the message bytes as they arrive, and call ``finish()``.  The intake adds the
RFC 5321 section 4.4 ``Received:`` header and holds the bytes in memory up to
``SPILL_AT`` (the size of the write buffer a file would need anyway); a bigger
message is streamed to ``queue/tmp/<id>`` from then on, so memory never grows
with message size.  A 250 to DATA means the message is fsynced in its
Maildirs or in the queue (docs/commit-protocol.rst).

Direct delivery (recipients all local)
--------------------------------------
The common case on an MX.  One thread call (``LocalAgent.deliver_direct``)
writes and fsyncs each recipient's copy into its Maildir ``tmp/``, renames it
into ``new/`` and fsyncs that folder; threads publishing into one folder at
the same time share its fsync (``storage.dirsync``).  Only then does
``finish()`` fire.  Per message that is one thread hand-off, one file
created, one fsync, one rename, and no queue files at all:
on the benchmark machine creating and deleting files was the largest single
cost of the old path (queue message, envelope and Maildir
copy for every local message).  Like mox, and unlike Postfix, nothing is
copied twice.

Anything the direct path cannot finish falls back to the queue, before the
reply: if a copy cannot be written (a full or broken mailbox) the whole
message is queued, and if some copies reached ``new/`` but others failed,
only the recipients still owed are queued; the manager retries those as usual.
A crash in the middle (some copies published, no 250 yet) can only cause a
duplicate when the client sends again, never a loss.

The queue (any remote recipient, or the fallback)
-------------------------------------------------
``QueueStore.commit``, one thread call per message: a message held in memory
is written inside its envelope, which is fsynced and renamed into ``env/``
(one file per message); a streamed one is fsynced and renamed into ``msg/``
first.  The directory fsyncs are shared by the threads committing at the
same time (group commit among the threads: the batch size follows the load,
and with no load nothing waits for anyone).  A failure of one message's own
step fails that message only; a failed directory fsync fails every message
that waited for it (each is answered 451/452, and nothing of it is left
behind).  Once committed, the queue manager is kicked.

Header changes
--------------
Before the commit the message checks (``pipeline``) read the header section
(``message()``: the fields, parsed as they streamed past by
``headers.HeaderReader``, bounded) and may ask for fields to be added and
removed; ``finish(changes)`` applies them before anything is made durable, so
a retry never repeats them.  Our ``Received:`` stays first, the added fields
follow it, then the client's fields that are kept, then the body untouched.
A message held in memory is simply rebuilt.  A spilled one keeps streaming
whole to ``queue/tmp/<id>`` (nothing to hold back, and nothing to redo when no
check changes the header); with changes its final file is written in a
thread as the new header section plus the body copied inside the kernel
(``headers.rewrite``), then committed as usual.

Writes to a spilled file go to a buffered file in the reactor thread: they
only reach the page cache.  Everything that waits for the disk (fsync,
rename, directory fsync, creating files from memory) runs through
``run_blocking``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import IO, Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack import headers
from mailstack.address import AddressError
from mailstack.envelope import Envelope, HeaderChanges
from mailstack.errors import PermanentFailure, Reply, TemporaryFailure
from mailstack.interfaces import IDirectDelivery, IIncoming, IIntake, IMessage, IMetrics
from mailstack.metrics import NoMetrics
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.queue.store import QueueStore
from mailstack.smtp.replies import DISK_FULL, HEADER_TOO_BIG
from mailstack.smtp.replies import LOCAL_ERROR as COMMIT_FAILED
from mailstack.storage import fsutil
from mailstack.threadpool import INLINE_BYTES

# Bytes of a message held in memory before it is streamed to queue/tmp/<id>:
# the write buffer such a file would have anyway, so memory per session is bounded.
SPILL_AT = 64 * 1024

# RFC 5322 section 2.1.1: lines SHOULD stay within 78 characters, MUST within 998.
FOLD_AT = 78
MAX_LINE = 998
_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def reply_for(error: BaseException) -> Reply:
    """What the client is told when a commit fails with ``error``."""
    return DISK_FULL if fsutil.is_disk_full(error) else COMMIT_FAILED


def received_header(envelope: Envelope, hostname: str, queue_id: str, now: float) -> bytes:
    """The ``Received:`` trace line of RFC 5321 section 4.4, folded, CRLF-terminated.

    ``from <helo> ([<ip>])`` (we do no reverse lookups, so TCP-info is the
    address literal alone), ``by <hostname>``, ``with <protocol>`` (RFC 3848
    keywords, with the TLS version and cipher as a comment), ``id <queue id>``,
    ``for <rcpt>`` only with exactly one recipient (more would disclose Bcc
    recipients to each other), then the RFC 5322 date.  A message generated here
    (no peer, no HELO: a DSN) has no ``from`` clause.
    """
    clauses = ["Received:"]
    if envelope.helo or envelope.peer:
        clauses.append(f"from {_token(envelope.helo) or 'unknown'} ({_literal(envelope.peer)})")
    clauses += [f"by {hostname}", f"with {_token(envelope.protocol) or 'ESMTP'}"]
    tls = " ".join(_token(w) for w in envelope.tls.split()[:4])
    if tls:
        clauses.append(f"({tls})")
    clauses.append(f"id {queue_id}")
    originals = list(dict.fromkeys(str(d.original) for d in envelope.recipients))
    if len(originals) == 1:
        clauses.append(f"for <{originals[0]}>")
    clauses[-1] += ";"
    clauses.append(_date(int(now)))
    return _fold(clauses).encode("utf-8")


@functools.lru_cache(maxsize=1)
def _date(second: int) -> str:
    """The RFC 5322 date of ``second`` (UTC); cached, as most messages share their second."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _token(text: str) -> str:
    """A client-supplied word made safe for a header: no spaces, comments or CRLF."""
    return _UNSAFE.sub("?", text[:255])


def _literal(peer: str) -> str:
    """RFC 5321 section 4.1.3 address literal of the peer IP."""
    if not peer:
        return "unknown"
    return f"[IPv6:{_token(peer)}]" if ":" in peer else f"[{_token(peer)}]"


def _fold(clauses: list[str]) -> str:
    """Join clauses into lines of at most FOLD_AT characters where possible.

    Folding happens only between clauses (RFC 5322 section 3.2.2 FWS).  Every
    clause is a few hundred characters at most (``_token`` truncates client
    text to 255), so no line comes near the 998 limit even standing alone.
    """
    lines = [clauses[0]]
    for word in clauses[1:]:
        if len(lines[-1]) + 1 + len(word) > FOLD_AT:
            lines.append("\t" + word)
        else:
            lines[-1] += " " + word
    assert all(len(line) < MAX_LINE for line in lines)
    return "\r\n".join(lines) + "\r\n"


@implementer(IIntake)
class Intake:
    """Accepts messages into Maildirs or a QueueStore, and kicks the queue manager.

    ``local``: the IDirectDelivery agent for direct delivery (the LocalAgent);
    without one, every message is queued.
    """

    log = Logger()

    def __init__(
        self,
        config: Any,
        store: QueueStore,
        kicker: Any,
        run_blocking: Callable[..., Deferred],
        clock: Any,
        local: IDirectDelivery | None = None,
        metrics: IMetrics | None = None,
    ) -> None:
        self._config = config
        self._metrics: IMetrics = metrics if metrics is not None else NoMetrics()
        self._store = store
        self._kicker = kicker
        self._run_blocking = run_blocking
        self._clock = clock
        self._local = local
        self._in_flight = 0  # commits between finish() and their outcome
        self._idle_waiters: list[Deferred] = []

    def begin(self, envelope: Envelope) -> Incoming:
        """A new message, its Received: header already written."""
        return Incoming(self, envelope)

    def wait_idle(self) -> Deferred:
        """Fires once no commit is in progress (graceful shutdown).

        The SMTP listeners' ``drain`` waits for it, so that a commit whose
        client already left still finishes before the thread pool stops.
        """
        d: Deferred = Deferred()
        if self._in_flight:
            self._idle_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _commit(self, entry: QueueEntry, data: bytes | None, rewrite: tuple | None = None) -> Deferred:
        """Fires with the queue id once the message is durable, in its Maildirs or the queue.

        ``data``: the whole message, or None if it was spilled to ``queue/tmp/<id>``.
        ``rewrite``: arguments of ``headers.rewrite`` that first give the
        spilled file its edited header section.
        """
        self._in_flight += 1
        if rewrite is not None:
            d = self._run_blocking(headers.rewrite, *rewrite)
            d.addCallback(lambda _: self._deliver(entry, data))
        else:
            d = self._deliver(entry, data)
        d.addBoth(self._commit_ended)
        return d

    def _deliver(self, entry: QueueEntry, data: bytes | None) -> Deferred:
        """Into the recipients' Maildirs directly if possible, else into the queue."""
        if self._local is not None and self._local.direct_ok(entry):
            d = self._run_blocking(
                self._local.deliver_direct, entry, data if data is not None else self._store.tmp_path(entry.id)
            )
            d.addCallbacks(self._published, self._not_delivered, callbackArgs=(entry, data), errbackArgs=(entry, data))
        else:
            d = self._queue(entry, data)
        return d

    def _commit_ended(self, result: Any) -> Any:
        self._in_flight -= 1
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
        return result

    # -- direct delivery ---------------------------------------------------------

    def _published(self, errors: list[BaseException | None], entry: QueueEntry, data: bytes | None) -> Any:
        if not any(errors):
            if data is None:  # the spill file in queue/tmp (no fsync: recover() empties tmp/)
                self._run_blocking(self._store.discard, entry.id).addErrback(self._not_discarded, entry.id)
            self._log_accepted(entry, "delivered")
            self._count_delivered(entry, entry.recipients)
            return entry.id
        owed = []
        for r, error in zip(entry.recipients, errors, strict=False):
            if error is None:
                self.log.info("{queue_id}: to=<{rcpt}> relay=local status=sent", queue_id=entry.id, rcpt=r.address)
                self._count_delivered(entry, [r])
            else:
                owed.append(r)
                self._log_deferred(entry, r.address, error)
        # Only what is still owed goes to the queue, so nobody gets a copy twice.
        return self._queue(dataclasses.replace(entry, recipients=owed), data)

    def _not_discarded(self, failure: Failure, queue_id: str) -> None:
        self.log.failure("removing the spill file of {queue_id}", failure, queue_id=queue_id)

    def _count_delivered(self, entry: QueueEntry, recipients: list[Any]) -> None:
        latency = max(0.0, self._clock.seconds() - entry.arrival)
        for _ in recipients:
            self._metrics.delivered("local", latency)

    def _not_delivered(self, failure: Failure, entry: QueueEntry, data: bytes | None) -> Deferred:
        """A copy could not be written (none was published): queue the whole message."""
        if failure.check(OSError, AddressError):
            error = failure.value
            assert error is not None  # a Failure always holds its exception
            for r in entry.recipients:
                self._log_deferred(entry, r.address, error)
        else:
            self.log.failure("direct delivery of {queue_id} failed; queueing it", failure, queue_id=entry.id)
        return self._queue(entry, data)

    def _log_deferred(self, entry: QueueEntry, rcpt: str, error: BaseException) -> None:
        self.log.error(
            "{queue_id}: to=<{rcpt}> relay=local status=deferred: {error}; queued for the queue manager",
            queue_id=entry.id,
            rcpt=rcpt,
            error=str(error),
            status="deferred",
        )

    # -- the queue ------------------------------------------------------------------

    def _queue(self, entry: QueueEntry, data: bytes | None) -> Deferred:
        """Commit to the queue (one thread call); a message held in memory goes
        inside its envelope, so it has no file of its own."""
        d = self._run_blocking(self._store.commit, entry, data)
        d.addCallback(lambda _: self._queued(entry))
        return d

    def _queued(self, entry: QueueEntry) -> str:
        self._log_accepted(entry, "queued")
        try:
            self._kicker.kick(entry.id)
        except Exception:
            # The message is safely queued; the next start (recover + scan) delivers it.
            self.log.failure("kicking the queue manager for {queue_id} failed", queue_id=entry.id)
        return entry.id

    def _log_accepted(self, entry: QueueEntry, outcome: str) -> None:
        """One event per accepted message; ``outcome`` says where it is now."""
        recipients = [r.address for r in entry.recipients]
        # One preformatted field: the text observer then formats nothing per
        # field, and this line is written for every message (the structured
        # keys stay for observers and tests).
        self.log.info(
            "{line}",
            line=f"accepted {entry.id} from {entry.peer} user={entry.user} sender=<{entry.sender}> "
            f"recipients={recipients} size={entry.size}: {outcome}",
            queue_id=entry.id,
            peer=entry.peer,
            user=entry.user,
            sender=entry.sender,
            recipients=recipients,
            size=entry.size,
            outcome=outcome,
        )


@implementer(IIncoming)
class Incoming:
    """One message being received: in memory up to SPILL_AT, then in ``queue/tmp/<id>``.

    ``size`` counts the client's bytes (for the SIZE limit); the queue entry
    records the stored size, Received: header included.
    """

    def __init__(self, intake: Intake, envelope: Envelope) -> None:
        self._intake = intake
        self._envelope = envelope
        self._store = intake._store
        self.queue_id = self._store.new_id()
        self.size = 0
        self._ended = False  # finish() or abort() was called: nothing more to do here
        self._error: BaseException | None = None
        self._file: IO[bytes] | None = None
        self._spilled = False
        self._arrival = intake._clock.seconds()
        self._received = received_header(envelope, intake._config.hostname, self.queue_id, self._arrival)
        self._held = [self._received]
        self._written = len(self._received)
        self._header = headers.HeaderReader()

    def write(self, data: bytes) -> None:
        """Append message bytes; an I/O error is kept and reported by finish()."""
        self.size += len(data)
        if self._error is not None or self._ended:
            return
        self._written += len(data)
        if not self._header.done:
            self._header.feed(data)
        if not self._spilled:
            self._held.append(data)
            if self._written > SPILL_AT:
                self._spill()
            return
        assert self._file is not None  # spilled without an error: the file is open
        try:
            self._file.write(data)
        except OSError as e:
            self._fail(e)

    def _spill(self) -> None:
        """Too big to hold: stream it to ``queue/tmp/<id>`` from now on."""
        self._spilled = True
        held, self._held = self._held, []
        try:
            self._file = self._store.open_tmp(self.queue_id)
            for chunk in held:
                self._file.write(chunk)
        except OSError as e:
            self._fail(e)

    def message(self) -> IMessage:
        """The data is complete: the header section and a reader for the checks."""
        self._header.end()
        self._close()  # flushes the buffer, so a thread can read the file
        if self._spilled:
            source: bytes | str = self._store.tmp_path(self.queue_id)
        else:
            self._held = [b"".join(self._held)]
            source = self._held[0]
        return ReceivedMessage(self._header.fields, self.size, source, len(self._received), self._intake._run_blocking)

    def finish(self, changes: HeaderChanges | None = None) -> Deferred:
        """Commit in threads, ``changes`` applied first; fires with the queue id,
        or errbacks TemporaryFailure (PermanentFailure: header section too big)."""
        if self._ended:
            return fail(TemporaryFailure(COMMIT_FAILED))
        self._ended = True
        self._close()  # flushes the buffer: ENOSPC can surface here
        if self._error is not None:
            error = self._error
            return self._discarded().addCallback(lambda _: self._refuse(Failure(error)))
        self._header.end()
        if self._header.overflow:
            self._held = []
            if self._spilled:
                self._discarded()
            return fail(PermanentFailure(HEADER_TOO_BIG))
        data = None if self._spilled else b"".join(self._held)
        self._held = []
        rewrite = None
        if changes:
            # The client's header section is replaced by the edited one.
            try:
                head = headers.edited(self._header.fields, changes)
            except Exception:  # a check's remove predicate failed
                failure = Failure()
                return self._discarded().addCallback(lambda _: self._refuse(failure))
            body_at = len(self._received) + self._header.length
            if data is None:
                rewrite = (self._store.tmp_path(self.queue_id), self._received + head, body_at)
            else:
                data = self._received + head + data[body_at:]
            self._written += len(head) - self._header.length
        d = self._intake._commit(self._entry(), data, rewrite)
        # The store removes an entry's files when its commit fails; removing
        # them again covers an unexpected error before it got that far.
        d.addErrback(lambda f: self._discarded().addCallback(lambda _: self._refuse(f)))
        return d

    def abort(self) -> None:
        """Discard the message (client went away, size exceeded).

        After finish() this does nothing: the commit in flight decides, and a
        client that vanished before our 250 may just send the message again.
        """
        if self._ended:
            return
        self._ended = True
        self._held = []
        self._close()
        if self._spilled:
            self._discarded()

    def _entry(self) -> QueueEntry:
        """The envelope record; one RecipientState per distinct final address.

        Local mailboxes are stored in key form (lowercase local part); remote
        addresses keep their case, which RFC 5321 section 2.4 makes the remote
        host's business.
        """
        env = self._envelope
        recipients: dict[tuple[str, bool], RecipientState] = {}
        for dest in env.recipients:
            address = dest.address.key if dest.local else str(dest.address)
            recipients.setdefault(
                (address, dest.local),
                RecipientState(
                    address=address,
                    original=str(dest.original),
                    local=dest.local,
                    notify=list(dest.notify),
                    orcpt=dest.orcpt,
                ),
            )
        return QueueEntry(
            id=self.queue_id,
            sender=str(env.sender) if env.sender is not None else "",
            arrival=self._arrival,
            recipients=list(recipients.values()),
            size=self._written,
            user=env.user,
            peer=env.peer,
            ret=env.ret,
            envid=env.envid,
            smtputf8=env.smtputf8,
        )

    def _fail(self, error: OSError) -> None:
        """Remember the first write error and stop writing."""
        if self._error is None:
            self._error = error
        self._close()

    def _close(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.close()
        except OSError as e:
            self._fail(e)

    def _refuse(self, failure: Failure) -> Failure:
        """Log why the message could not be accepted; tell the client only the Reply."""
        error = failure.value
        assert error is not None  # a Failure always holds its exception
        reply = reply_for(error)
        if isinstance(error, OSError):
            self._intake.log.error(
                "queueing {queue_id} failed: {error}",
                queue_id=self.queue_id,
                error=str(failure.value),
                reply=str(reply),
            )
        else:
            self._intake.log.failure("queueing {queue_id} failed", failure=failure, queue_id=self.queue_id)
        return Failure(TemporaryFailure(reply))

    def _discarded(self) -> Deferred:
        """Remove this id's queue files in a thread; never errbacks (recover() is the backstop)."""
        d = self._intake._run_blocking(self._store.discard, self.queue_id)
        d.addErrback(
            lambda f: self._intake.log.failure("removing {queue_id} failed", failure=f, queue_id=self.queue_id)
        )
        return d


@implementer(IMessage)
class ReceivedMessage:
    """A complete message as the checks see it before the commit."""

    def __init__(
        self,
        header: tuple[headers.Field, ...],
        size: int,
        source: bytes | str,
        offset: int,
        run_blocking: Callable[..., Deferred],
    ) -> None:
        self.header = header
        self.size = size
        self._source = source  # the bytes in memory, or the path of the spill file
        self._offset = offset  # where the client's message starts (after our Received:)
        self._run_blocking = run_blocking

    def run_blocking(self, reader: Callable[[IO[bytes]], Any]) -> Deferred:
        if isinstance(self._source, bytes) and len(self._source) - self._offset <= INLINE_BYTES:
            return maybeDeferred(_read, self._source, self._offset, reader)  # nothing to block on
        return self._run_blocking(_read, self._source, self._offset, reader)


def _read(source: bytes | str, offset: int, reader: Callable[[IO[bytes]], Any]) -> Any:
    """Blocking: ``reader`` of the message from ``offset``, in memory or in its file."""
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
        f.seek(offset)
        return reader(f)
