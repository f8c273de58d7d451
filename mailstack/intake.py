# -*- test-case-name: tests.test_intake -*-
"""The only door for new mail: stream a message into the queue and commit it once.

SMTP sessions and the DSN builder both call ``Intake.begin(envelope)``, write
the message bytes as they arrive, and call ``finish()``.  The intake adds the
RFC 5321 section 4.4 ``Received:`` header, streams everything to
``queue/tmp/<id>`` and commits it with ``QueueStore.commit`` in a thread.

One commit point
----------------
All accepted mail, for local and remote recipients alike, is committed to the
queue first; a 250 reply to DATA means exactly "the queue commit finished"
(message fsynced, renamed, envelope written, directories fsynced).  Right after
the commit the intake kicks the queue manager, whose local agent drains the
local recipients into their Maildirs at once.  Why not write Maildirs directly
during DATA, as mox does?  Because with one commit point

* a message with both local and remote recipients can never be half-accepted:
  either the whole transaction is on disk or the client gets a 4xx;
* a Maildir write failure (disk full, a broken mailbox) is just a 4xx for that
  recipient, retried by the manager like any remote deferral;
* crash recovery has a single place to look: the queue, at-least-once.

It costs one extra copy of each local message, which the page cache absorbs.

Writes go to a buffered file in the reactor thread: they only reach the page
cache.  Everything that waits for the disk (fsync, rename, directory fsync) runs
through ``run_blocking``.

Group commit
------------
A commit is ``QueueStore.prepare`` (the file fsyncs: ``prepare_message`` and
``prepare_envelope``, two thread calls side by side per message, many
messages in parallel) followed by ``publish_messages`` (renames into
``msg/``, one fsync of ``msg/``) and ``publish_envelopes`` (renames into
``env/``, one fsync of ``env/``).  Each of the two goes through a
``GroupCommit``: one batch is in flight per stage, and every message that
arrives meanwhile joins the next batch, so each directory is fsynced once per
batch however many sessions are committing, and the two stages pipeline.  With no load a batch is a single message and nothing waits for a
timer.  A failure of one message's own step fails that message only; a failed
directory fsync fails the whole batch (each is answered 451/452, and nothing of
it is left behind).  Each Deferred fires only after its batch is durable.

Inline local delivery
---------------------
For a message whose recipients are all local, a thread call running beside
the one that prepares the commit writes each recipient's copy into its Maildir
``tmp/`` (``LocalAgent.prepare_inline``); after the 250, a second
``GroupCommit`` moves the copies of a whole batch into ``new/`` (one fsync per
folder) and drops the queue entries (``LocalAgent.publish_inline``).  So the
common case costs two parallel thread calls per message plus two per batch, instead of
the manager's load / deliver / remove round trips, and the queue commit stays
the one commit point.  Anything unusual (a remote recipient, a Maildir error)
goes to the manager as before, via ``kick``.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import IO, Any, Callable

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.batching import GroupCommit
from mailstack.envelope import Envelope
from mailstack.errors import Reply, TemporaryFailure
from mailstack.interfaces import IIncoming, IIntake
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.queue.store import QueueStore
from mailstack.storage import fsutil

# RFC 5321 section 4.2.3 reply texts; the details go to the log only.
COMMIT_FAILED = Reply(451, "4.3.0", "Local error in processing, try again later")
DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")

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


def _date(second: int, _cache: list = [None, ""]) -> str:
    """The RFC 5322 date of ``second`` (UTC); cached, as most messages share their second."""
    if _cache[0] != second:
        _cache[1] = format_datetime(datetime.fromtimestamp(second, timezone.utc))
        _cache[0] = second
    return _cache[1]


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


def _local_agent(kicker: Any) -> Any:
    """The kicker's local delivery agent if it can deliver inline (the QueueManager's)."""
    agent = getattr(kicker, "local", None)
    return agent if callable(getattr(agent, "prepare_inline", None)) else None


@implementer(IIntake)
class Intake:
    """Accepts messages into a QueueStore and kicks the queue manager.

    ``local``: the LocalAgent for inline delivery; by default the kicker's
    ``local`` attribute (the QueueManager's agent), if it has one.
    """

    log = Logger()

    def __init__(
        self,
        config: Any,
        store: QueueStore,
        kicker: Any,
        run_blocking: Callable[..., Deferred],
        clock: Any,
        local: Any = None,
    ) -> None:
        self._config = config
        self._store = store
        self._kicker = kicker
        self._run_blocking = run_blocking
        self._clock = clock
        self._local = local if local is not None else _local_agent(kicker)
        # Two pipelined stages: messages into msg/ (fsync msg/), then envelopes
        # into env/ (fsync env/); a batch in the second stage does not hold up
        # the next batch's first stage.
        self._envelopes = GroupCommit(run_blocking, self._publish_envelopes)
        self._inline = 0  # inline deliveries between their 250 and their end
        self._idle_waiters: list[Deferred] = []
        self._committer = GroupCommit(run_blocking, self._publish_messages, then=self._envelopes)
        self._deliverer = GroupCommit(run_blocking, self._deliver)

    def begin(self, envelope: Envelope) -> "Incoming":
        """Open ``queue/tmp/<id>`` and write the Received: header into it."""
        return Incoming(self, envelope)

    # -- the commit: prepare (one thread call per message), publish (per batch)

    def _commit(self, entry: QueueEntry) -> Deferred:
        """Fires with ``(entry, copies)`` once the entry is durable.

        ``copies`` is None (the manager delivers) or, for an inline delivery,
        a Deferred of the Maildir copies being written by a thread call that
        runs beside the commit: the 250 never waits for them.  If the commit
        fails, the copies are dropped as soon as they are written.
        """
        local = self._local if self._local is not None and self._local.inline_ok(entry) else None
        copies = None
        if local is not None:
            copies = self._run_blocking(
                local.prepare_inline, entry, self._store.tmp_path(entry.id), self._store.message_path(entry.id)
            )
            copies.addErrback(self._no_copies, entry)
        # The message fsync and the envelope write + fsync, side by side.
        # Both halves end before anything else happens, so that a failure's
        # clean-up (Incoming._discarded) never races with the other half.
        d = DeferredList(
            [self._run_blocking(self._store.prepare_message, entry), self._run_blocking(self._store.prepare_envelope, entry)],
            consumeErrors=True,
        )
        d.addCallback(self._prepared, entry)
        d.addCallback(self._envelopes.submit)

        def failed(failure: Failure) -> Failure:
            if copies is not None:
                copies.addCallback(self._drop_copies, entry)
            return failure

        d.addCallbacks(lambda _: (entry, copies), failed)
        return d

    def _prepared(self, results: list[tuple[bool, Any]], entry: QueueEntry) -> Any:
        """Both halves of the prepare ended: on to the group commit, or the first failure."""
        for ok, result in results:
            if not ok:
                return result
        return self._committer.submit(entry)

    def _no_copies(self, failure: Failure, entry: QueueEntry) -> None:
        self.log.failure("inline delivery of {queue_id}: preparing copies failed", failure, queue_id=entry.id)
        return None

    def _drop_copies(self, pending: Any, entry: QueueEntry) -> None:
        """The commit failed: no Maildir may ever see this message."""
        if pending:
            d = self._run_blocking(self._discard_copies, pending)
            d.addErrback(lambda f: self.log.failure("dropping copies of {queue_id}", f, queue_id=entry.id))

    def _discard_copies(self, pending: list[Any]) -> None:
        """Blocking: drop prepared Maildir copies."""
        for p in pending:
            self._local.discard_inline(p)

    def _publish_messages(self, entries: list[QueueEntry]) -> list[Any]:
        """Blocking: commit step 3 for a batch; per entry the entry itself, or its error."""
        errors = self._store.publish_messages(entries)
        return [entry if error is None else error for entry, error in zip(entries, errors)]

    def _publish_envelopes(self, entries: list[QueueEntry]) -> list[Any]:
        """Blocking: commit step 4 (the commit record) for a batch."""
        errors = self._store.publish_envelopes(entries)
        return [entry if error is None else error for entry, error in zip(entries, errors)]

    def _deliver(self, items: list[tuple[QueueEntry, Any]]) -> list[Any]:
        """Blocking: inline delivery of a batch of committed entries."""
        return self._local.publish_inline(items, self._clock.seconds())

    def _run_inline(self, entry: QueueEntry, pending: list[Any]) -> None:
        d = self._deliverer.submit((entry, pending))
        d.addBoth(self._inline_done, entry)

    def _inline_done(self, result: Any, entry: QueueEntry) -> None:
        """One event per delivery; the manager takes over what is not settled."""
        try:
            self._inline_report(result, entry)
        finally:
            self._inline_ended()

    def _inline_report(self, result: Any, entry: QueueEntry) -> None:
        if isinstance(result, Failure):
            self.log.failure("inline delivery of {queue_id} failed", result, queue_id=entry.id)
            self._kick(entry.id)
            return
        errors, settled = result
        delay = self._clock.seconds() - entry.arrival
        for r, error in zip(entry.recipients, errors):
            if error is None:
                self.log.info(
                    "{queue_id}: to=<{rcpt}> relay=local delay={delay:.3f} status=sent (250 2.0.0 Delivered)",
                    queue_id=entry.id,
                    rcpt=r.address,
                    delay=delay,
                    status="sent",
                )
            else:
                self.log.error(
                    "{queue_id}: to=<{rcpt}> relay=local status=deferred: {error}; the queue manager retries",
                    queue_id=entry.id,
                    rcpt=r.address,
                    error=str(error),
                    status="deferred",
                )
        if not settled:
            self._kick(entry.id)

    def _accepted(self, item: tuple[QueueEntry, Any]) -> str:
        """Log the accepted message, then deliver it inline or kick the manager."""
        entry, copies = item
        self.log.info(
            "accepted {queue_id} from {peer} user={user} sender=<{sender}> recipients={recipients} size={size}",
            queue_id=entry.id,
            peer=entry.peer,
            user=entry.user,
            sender=entry.sender,
            recipients=[r.address for r in entry.recipients],
            size=entry.size,
        )
        if copies is None:
            self._kick(entry.id)
        else:
            self._inline += 1
            copies.addCallback(self._copies_ready, entry)
        return entry.id

    def wait_idle(self) -> Deferred:
        """Fires once no inline delivery is in progress (graceful shutdown).

        The SMTP listeners' ``drain`` waits for it, so that a message
        acknowledged just before SIGTERM is in its Maildir before the queue
        manager and the thread pool stop (it would be delivered at the next
        start otherwise: queued, never lost).
        """
        d: Deferred = Deferred()
        if self._inline:
            self._idle_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _inline_ended(self) -> None:
        self._inline -= 1
        if not self._inline:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def _copies_ready(self, pending: Any, entry: QueueEntry) -> None:
        if pending:
            self._run_inline(entry, pending)
        else:
            self._kick(entry.id)  # the copies could not be written: the manager delivers
            self._inline_ended()

    def _kick(self, queue_id: str) -> None:
        try:
            self._kicker.kick(queue_id)
        except Exception:
            # The message is safely queued; the next start (recover + scan) delivers it.
            self.log.failure("kicking the queue manager for {queue_id} failed", queue_id=queue_id)
@implementer(IIncoming)
class Incoming:
    """One message being written to ``queue/tmp/<id>``.

    ``size`` counts the client's bytes (for the SIZE limit); the queue entry
    records the file size, Received: header included.
    """

    def __init__(self, intake: Intake, envelope: Envelope) -> None:
        self._intake = intake
        self._envelope = envelope
        self._store = intake._store
        self.queue_id = self._store.new_id()
        self.size = 0
        self._written = 0
        self._ended = False  # finish() or abort() was called: nothing more to do here
        self._error: BaseException | None = None
        self._file: IO[bytes] | None = None
        self._arrival = intake._clock.seconds()
        header = received_header(envelope, intake._config.hostname, self.queue_id, self._arrival)
        try:
            self._file = self._store.open_tmp(self.queue_id)
            self._file.write(header)
            self._written = len(header)
        except OSError as e:
            self._fail(e)

    def write(self, data: bytes) -> None:
        """Append message bytes; an I/O error is kept and reported by finish()."""
        self.size += len(data)
        if self._file is None:
            return
        try:
            self._file.write(data)
            self._written += len(data)
        except OSError as e:
            self._fail(e)

    def finish(self) -> Deferred:
        """Commit in a thread; fires with the queue id, or errbacks TemporaryFailure."""
        if self._ended:
            return fail(TemporaryFailure(COMMIT_FAILED))
        self._ended = True
        self._close()  # flushes the buffer: ENOSPC can surface here
        if self._error is not None:
            error = self._error
            return self._discarded().addCallback(lambda _: self._refuse(Failure(error)))
        entry = self._entry()
        d = self._intake._commit(entry)
        # The store removes an entry's files when its commit fails; removing
        # them again covers an unexpected error before it got that far.
        d.addCallbacks(
            self._intake._accepted,
            lambda f: self._discarded().addCallback(lambda _: self._refuse(f)),
        )
        return d

    def abort(self) -> None:
        """Discard the message (client went away, size exceeded).

        After finish() this does nothing: the commit in flight decides, and a
        client that vanished before our 250 may just send the message again.
        """
        if self._ended:
            return
        self._ended = True
        self._close()
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
                RecipientState(address=address, original=str(dest.original), local=dest.local),
            )
        return QueueEntry(
            id=self.queue_id,
            sender=str(env.sender) if env.sender is not None else "",
            arrival=self._arrival,
            recipients=list(recipients.values()),
            size=self._written,
            user=env.user,
            peer=env.peer,
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
        """Log why the message could not be queued; tell the client only the Reply."""
        reply = reply_for(failure.value)
        if isinstance(failure.value, OSError):
            self._intake.log.error(
                "queueing {queue_id} failed: {error}", queue_id=self.queue_id, error=str(failure.value), reply=str(reply)
            )
        else:
            self._intake.log.failure("queueing {queue_id} failed", failure=failure, queue_id=self.queue_id)
        return Failure(TemporaryFailure(reply))

    def _discarded(self) -> Deferred:
        """Remove this id's files in a thread; never errbacks (recover() is the backstop)."""
        d = self._intake._run_blocking(self._store.discard, self.queue_id)
        d.addErrback(
            lambda f: self._intake.log.failure("removing {queue_id} failed", failure=f, queue_id=self.queue_id)
        )
        return d
