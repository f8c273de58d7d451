# -*- test-case-name: tests.queue.test_manager -*-
"""The queue manager: when each queued message is tried, and by which agent.

Time plus concurrency over the files of ``queue/store.py`` (Postfix's qmgr):

* ``startService`` runs ``store.recover()`` and ``store.scan()`` in a thread and
  builds a heap of ``(due, queue_id)`` from the envelopes alone, never reading a
  message body.  One ``IDelayedCall`` is armed for the earliest entry.
* ``kick(id)`` (from the intake after each commit, and from ``flush``) makes an
  entry due now.  Local recipients are delivered at once through the local agent;
  remote ones when their ``next_attempt`` has come.
* Before connecting out, the attempt is recorded, so a crash in the middle never
  causes a hot retry loop (style.md 4 item 13): ``store.mark_attempt`` sets the
  envelope's mtime to the earliest time the entry may be tried again (its
  ``next_attempt`` after this attempt), as Postfix's qmgr does with ``utime``:
  one system call, no file created or removed, no fsync.  A process crash keeps
  it (the page cache survives the process), and the start-up scan schedules
  the entry no earlier than the mark.  A system crash may lose it, which only
  means an earlier retry.  The envelope's contents are not touched before the
  attempt, so no crash can damage it: the message is never lost.  Results
  (``attempts``, ``next_attempt``, replies, history) are saved durably
  afterwards (a new envelope, so the mark goes with the old one), unless the
  entry is finished and removed.  Removals after final delivery are batched
  and do not fsync ``env/`` (a crash that undoes one means a second delivery,
  never none), except when a DSN was sent for the entry.
* Loads of entries that became due (envelope, attempt mark, a small
  message's bytes) and removals of finished ones share one thread call per
  batch (``batching.GroupCommit``): a thread hand-off costs the reactor
  more than the file work of one message.
* Remote attempts are one per (entry, destination domain), limited by
  ``relay.max_connections`` overall and ``relay.max_per_domain`` per domain
  (0 means no limit).
* 4xx and unreachable hosts are retried on ``relay.retry_intervals`` until
  ``relay.max_queue_lifetime``; 5xx fails the recipient at once.  Failed
  recipients get one RFC 3464 DSN per entry and round (``queue/dsn.py``),
  submitted through the intake with sender ``<>``; they are marked ``notified``
  only once that DSN is committed.  Never a DSN for a message from ``<>``.
* An entry leaves the queue only when ``entry.done``.
* The ``queue/flush`` trigger file (``mailstack queue flush``) is polled about
  once a second; when present every entry is retried now.
* Saves take a lock on the entry (``entry_lock``), as does ``mailstack queue
  delete``, so a deletion beside the running server is never undone by a save.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.address import AddressError, parse_address
from mailstack.batching import GroupCommit
from mailstack.envelope import Destination, Envelope
from mailstack.errors import MailError, Reply
from mailstack.interfaces import IQueueKicker
from mailstack.queue import schedule
from mailstack.queue.entry import DELIVERED, FAILED, FORMAT_VERSION, PENDING, QueueEntry, RecipientState
from mailstack.queue.store import attempt_mark_of
from mailstack.storage import fsutil

# Our own replies recorded in RecipientState.last_reply (never sent to a peer).
R_NO_RESULT = Reply(451, "4.3.0", "Delivery agent gave no result")
R_AGENT_ERROR = Reply(451, "4.3.0", "Local error in delivery")
R_EXPIRED = Reply(451, "4.4.7", "Delivery time expired")

MAX_HISTORY = 20  # attempts remembered per recipient for `queue show`
SCAN_BATCH = 5000  # envelopes read per thread call at start-up
PRELOAD_MAX = 64 * 1024  # messages up to this size are read with the envelope and relayed from memory
HEADER_LIMIT = 65536  # bytes of original headers quoted in a DSN


@contextmanager
def entry_lock(store: Any, queue_id: str) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the entry's message file (blocking).

    Yields whether the entry still exists.  ``store.remove`` unlinks the
    envelope and then the message; done under this lock (``remove_entry``),
    "message file present" inside the lock means "not deleted".  A lock per
    entry, so saves of different entries never wait for each other.
    """
    path = store.message_path(queue_id)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield os.path.exists(path)
    finally:
        os.close(fd)


def save_unless_deleted(store: Any, entry: QueueEntry) -> bool:
    """Save ``entry`` unless ``queue delete`` removed it meanwhile (blocking)."""
    with entry_lock(store, entry.id) as present:
        if not present:
            return False
        store.save(entry)
        return True


def remove_entry(store: Any, queue_id: str) -> bool:
    """Remove an entry under its lock (blocking; ``queue delete``).

    False if there was no envelope."""
    with entry_lock(store, queue_id):
        return bool(store.remove(queue_id))


def read_headers(path: str, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of a stored message, up to ``limit`` bytes (blocking)."""
    out = bytearray()
    try:
        with open(path, "rb") as f:
            for line in f:
                if line in (b"\r\n", b"\n"):
                    break
                if len(out) + len(line) > limit:
                    break
                out += line
    except OSError:
        pass
    return bytes(out)


def entry_due(entry: QueueEntry, now: float, warning_after: float | None) -> float:
    """When the manager should next look at ``entry`` (pure; used at scan time too).

    The earliest ``next_attempt`` of its unfinished recipients, the delay warning
    time if one is owed, or ``now`` if only a bounce or the removal is left.
    """
    times = [r.next_attempt for r in entry.recipients if not r.final]
    if entry.sender and any(r.status == FAILED and not r.notified for r in entry.recipients):
        times.append(now)
    if not times:
        return now  # done: remove it
    if entry.sender:
        warn = schedule.delay_warning_time(entry.arrival, warning_after, entry.delay_warned)
        if warn is not None and any(not r.final for r in entry.recipients):
            times.append(warn)
    return min(times)


def _due_from_json(data: Any, queue_id: str, now: float, warning_after: float | None) -> float | None:
    """``entry_due`` straight from a parsed envelope, without building a QueueEntry.

    None when anything looks unusual (wrong version, id or types): the caller
    then goes through ``store.load``, which validates fully and moves an
    unreadable envelope to ``corrupt/``.
    """
    if type(data) is not dict or data.get("version") != FORMAT_VERSION or data.get("id") != queue_id:
        return None
    sender = data.get("sender")
    recipients = data.get("recipients")
    if type(sender) is not str or type(recipients) is not list or not recipients:
        return None
    times = []
    owed_bounce = False
    pending = False
    for r in recipients:
        if type(r) is not dict:
            return None
        status = r.get("status")
        if status == PENDING:
            t = r.get("next_attempt")
            if type(t) not in (int, float):
                return None
            times.append(t)
            pending = True
        elif status == FAILED:
            if type(r.get("notified")) is not bool:
                return None
            owed_bounce |= not r["notified"]
        elif status != DELIVERED:
            return None
    if sender and owed_bounce:
        times.append(now)
    if not times:
        return now
    if sender and pending:
        arrival = data.get("arrival")
        warned = data.get("delay_warned")
        if type(arrival) not in (int, float) or type(warned) is not bool:
            return None
        warn = schedule.delay_warning_time(arrival, warning_after, warned)
        if warn is not None:
            times.append(warn)
    return min(times)


def scan_schedule(store: Any, ids: list[str], now: float, warning_after: float | None) -> list[tuple[float, str]]:
    """``(due, id)`` of the entries ``ids`` (blocking; one batch of the start-up scan).

    Reads each envelope once and takes only what the schedule needs; an entry
    removed meanwhile is skipped, an unusual one goes through ``store.load``.
    """
    out = []
    loads = json.loads
    if not ids:
        return out
    folder = os.path.dirname(store.envelope_path(ids[0]))  # ids come from store.ids(): checked
    for qid in ids:
        due = None
        mark = 0.0
        try:
            data, st = fsutil.read_small_stat(f"{folder}/{qid}.json")
            mark = attempt_mark_of(st)
            due = _due_from_json(loads(data.decode("utf-8")), qid, now, warning_after)
        except FileNotFoundError:
            continue  # delivered or deleted since the listing
        except Exception:  # unreadable: store.load below decides (and moves it aside)
            due = None
        if due is None:
            try:
                due = entry_due(store.load(qid), now, warning_after)
            except KeyError:  # NoSuchEntry / CorruptEntry: gone or moved aside
                continue
        # Tried when the last process stopped (crashed): not before its mark.
        out.append((max(due, mark), qid))
    return out


class _SaveFailed(Exception):
    """The save before connecting out failed (the entry is not attempted)."""


class _Slots:
    """Connection slots: a global cap and a per-domain cap (0: unlimited)."""

    def __init__(self, total: int, per_domain: int) -> None:
        self.total = total
        self.per_domain = per_domain
        self.used = 0
        self.by_domain: dict[str, int] = {}
        self._waiting: list[tuple[str, Deferred]] = []

    def _fits(self, domain: str) -> bool:
        if self.total and self.used >= self.total:
            return False
        if self.per_domain and self.by_domain.get(domain, 0) >= self.per_domain:
            return False
        return True

    def _take(self, domain: str) -> None:
        self.used += 1
        self.by_domain[domain] = self.by_domain.get(domain, 0) + 1

    def acquire(self, domain: str) -> Deferred:
        if self._fits(domain) and not any(d == domain for d, _ in self._waiting):
            self._take(domain)
            return succeed(True)
        d: Deferred = Deferred()
        self._waiting.append((domain, d))
        return d

    def release(self, domain: str) -> None:
        self.used -= 1
        n = self.by_domain.get(domain, 0) - 1
        if n > 0:
            self.by_domain[domain] = n
        else:
            self.by_domain.pop(domain, None)
        self._wake()

    def _wake(self) -> None:
        i = 0
        while i < len(self._waiting):
            if self.total and self.used >= self.total:
                return
            domain, d = self._waiting[i]
            if self._fits(domain):
                del self._waiting[i]
                self._take(domain)
                d.callback(True)
            else:
                i += 1

    def cancel_all(self) -> None:
        """Shutting down: every waiter gets False and must not connect."""
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.callback(False)


@implementer(IQueueKicker)
class QueueManager(Service):
    """A Service on the shared reactor; see the module docstring."""

    log = Logger()
    name = "queue-manager"

    def __init__(
        self,
        store: Any,
        local: Any,
        remote: Any,
        clock: Any,
        config: Any,
        run_blocking: Callable[..., Deferred],
        intake: Any = None,
        *,
        router: Any = None,
        rng: random.Random | None = None,
        flush_poll: float = 1.0,
        max_active: int = 1000,
        stop_timeout: float | None = None,
    ) -> None:
        self.store = store
        self.local = local
        self.remote = remote
        self.clock = clock
        self.config = config
        self.run_blocking = run_blocking
        self.intake = intake  # may be set after construction (the intake needs us as kicker)
        self.router = router  # optional IRouter: DSNs to local senders follow aliases
        self.rng = rng if rng is not None else random.Random()
        self.flush_poll = flush_poll
        self.max_active = max(1, max_active)
        self.stop_timeout = stop_timeout if stop_timeout is not None else float(config.smtp.shutdown_grace)
        relay = config.relay
        self._slots = _Slots(relay.max_connections, relay.max_per_domain)
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}  # queue_id -> the live heap key
        self._forced: set[str] = set()  # flushed: try remote recipients regardless of next_attempt
        self._active: dict[str, Deferred] = {}  # queue_id -> Deferred firing when its round ends
        self._again: set[str] = set()  # kicked while active: look again right after
        self._files = GroupCommit(run_blocking, self._file_batch)  # loads and removals, see _file_batch
        self._timer: Any = None
        self._poller: LoopingCall | None = None
        self._stopping = False
        self._loaded: Deferred | None = None

    # -- Service ------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._stopping = False
        # Synchronously, before any listener accepts: recover() empties tmp/ and
        # drops messages without an envelope, which would race with commits.
        try:
            # Directory listings only (no envelope is parsed): fast with a large
            # queue.  Unreadable envelopes are moved aside by the scan below.
            found = self.store.recover(read_envelopes=False)
            if found:
                self.log.info("queue recovered: {recovery}", recovery=found)
        except Exception:
            self.log.failure("queue recovery failed")
        self._loaded = Deferred.fromCoroutine(self._load())
        self._loaded.addErrback(lambda f: self.log.failure("queue scan failed", f))

    async def _load(self) -> None:
        """Schedule every committed entry, reading envelopes in batches in threads.

        The listing of ``env/`` is the set of committed entries (the envelope
        is the commit record), so listing after ``recover()`` and reading
        while the listeners already accept is safe: an entry committed later
        is kicked by the intake, one removed meanwhile is skipped (or found
        gone by its round).  Entries are scheduled batch by batch, oldest
        first, so delivery starts before the whole queue has been read.
        """
        now = self.clock.seconds()
        warn = self.config.relay.delay_warning_after
        store = self.store
        count = 0
        if callable(getattr(store, "ids", None)) and callable(getattr(store, "envelope_path", None)):
            ids = await self.run_blocking(store.ids)
            for i in range(0, len(ids), SCAN_BATCH):
                if self._stopping:
                    return
                found = await self.run_blocking(scan_schedule, store, ids[i : i + SCAN_BATCH], now, warn)
                count += self._add_found(found)
        else:
            found = await self.run_blocking(
                lambda: [(max(entry_due(e, now, warn), store.attempt_mark(e.id)), e.id) for e in store.scan()]
            )
            count += self._add_found(found)
        if self._stopping:
            return
        self.log.info("queue loaded: {count} entries", count=count)
        if self.flush_poll:
            self._poller = LoopingCall(self._poll_flush)
            self._poller.clock = self.clock
            self._poller.start(self.flush_poll, now=True).addErrback(
                lambda f: self.log.failure("flush poller stopped", f)
            )

    def _add_found(self, found: list[tuple[float, str]]) -> int:
        if self._stopping:
            return 0
        for due, qid in found:
            if qid not in self._due and qid not in self._active:
                self._due[qid] = due
                heapq.heappush(self._heap, (due, qid))
        self._pump()
        return len(found)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        self._slots.cancel_all()
        for agent in (self.remote, self.local):
            close = getattr(agent, "close_idle", None)
            if callable(close):
                close()  # no more connection reuse; idle sessions say QUIT
        if not self._active:
            return succeed(None)
        done: Deferred = Deferred()
        pending = DeferredList([_chain(d) for d in self._active.values()], consumeErrors=True)
        timeout = self.clock.callLater(self.stop_timeout, lambda: done.called or done.callback(None))

        def finished(_: Any) -> None:
            if timeout.active():
                timeout.cancel()
            if not done.called:
                done.callback(None)

        pending.addBoth(finished)
        return done

    # -- IQueueKicker -------------------------------------------------------

    def kick(self, queue_id: str) -> None:
        """A new or changed entry is on disk: look at it now."""
        if self._stopping:
            return
        if queue_id in self._active:
            self._again.add(queue_id)
            return
        self._schedule(queue_id, self.clock.seconds())

    def flush(self) -> None:
        """Retry everything now (``mailstack queue flush``)."""
        now = self.clock.seconds()
        self.log.info("queue flush: {count} entries", count=len(self._due) + len(self._active))
        for qid in self._due:
            self._due[qid] = now
            self._forced.add(qid)
        for qid in self._active:
            self._again.add(qid)
            self._forced.add(qid)
        self._heap = [(now, qid) for qid in self._due]
        heapq.heapify(self._heap)
        self._pump()

    def _poll_flush(self) -> Deferred | None:
        if self._stopping:
            return None
        d = self.run_blocking(self.store.flush_requested)

        def check(requested: Any) -> None:
            if requested and not self._stopping:
                self.flush()

        d.addCallback(check)
        d.addErrback(lambda f: self.log.failure("flush trigger check failed", f))
        return d

    # -- the schedule -------------------------------------------------------

    def scheduled(self) -> dict[str, float]:
        """``{queue_id: due}`` of waiting entries (tests, diagnostics)."""
        return dict(self._due)

    def _schedule(self, queue_id: str, when: float) -> None:
        old = self._due.get(queue_id)
        if old is not None and old <= when and queue_id not in self._forced:
            return
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))
        self._pump()

    def _pump(self) -> None:
        """Start every due entry (up to ``max_active``) and arm the timer."""
        if self._stopping:
            return
        now = self.clock.seconds()
        while self._heap and len(self._active) < self.max_active:
            when, qid = self._heap[0]
            if self._due.get(qid) != when:
                heapq.heappop(self._heap)  # stale
                continue
            if when > now:
                break
            heapq.heappop(self._heap)
            del self._due[qid]
            self._start(qid)
        self._arm(now)

    def _arm(self, now: float) -> None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if not self._heap or len(self._active) >= self.max_active:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        when = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() == when:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, when - now), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._pump()

    def _start(self, qid: str) -> None:
        forced = qid in self._forced
        self._forced.discard(qid)
        d = Deferred.fromCoroutine(self._round(qid, forced))
        self._active[qid] = d

        def finished(result: Any) -> None:
            self._active.pop(qid, None)
            again = qid in self._again
            self._again.discard(qid)
            if result is not None and not self._stopping:
                due = self.clock.seconds() if again else result
                self._due[qid] = due
                heapq.heappush(self._heap, (due, qid))
            self._pump()

        def failed(f: Any) -> None:
            self.log.failure("queue round failed", f, queue_id=qid)
            retry = self.clock.seconds() + schedule.interval_for(1, self.config.relay.retry_intervals)
            finished(retry)

        d.addCallbacks(finished, failed)

    # -- one round for one entry --------------------------------------------

    async def _round(self, qid: str, forced: bool) -> float | None:
        """Deliver what is due in entry ``qid``; returns its next due time or None."""
        relay = self.config.relay
        now = self.clock.seconds()
        try:
            begun = await self._files.submit((self._begin, qid, now, forced))
        except _SaveFailed:
            self.log.failure("cannot save queue entry {queue_id}; not connecting out", queue_id=qid)
            return now + schedule.interval_for(1, relay.retry_intervals)
        except Exception:
            # Deleted by `queue delete`, or unreadable (moved to corrupt/ by load()).
            self.log.info("queue entry {queue_id} is gone", queue_id=qid)
            return None
        if begun is None:
            return None
        entry, due, message = begun
        local = [r for r in due if r.local]
        remote = [r for r in due if not r.local]

        work = []
        if local:
            work.append(self._deliver(entry, self.local, local, None, now))
        by_domain: dict[str, list[RecipientState]] = {}
        for r in remote:
            by_domain.setdefault(r.domain, []).append(r)
        for domain, rcpts in by_domain.items():
            work.append(self._deliver(entry, self.remote, rcpts, domain, now, message))
        if len(work) == 1:
            await work[0]  # the usual case: no Deferred needed to run it
        elif work:
            await DeferredList([Deferred.fromCoroutine(w) for w in work], consumeErrors=True)

        now = self.clock.seconds()
        changed = bool(due)
        bounced = any(r.status == FAILED for r in entry.recipients)
        changed |= await self._notify(entry, now)
        if entry.done:
            try:
                # Without a DSN involved, the removal need not be durable: a
                # crash that undoes it only means a second delivery, never none.
                await self._files.submit((self._remove, entry.id, bounced))
            except Exception:
                self.log.failure("cannot remove queue entry {queue_id}", queue_id=qid)
                return now + schedule.interval_for(1, relay.retry_intervals)
            if bounced or not due:
                self.log.info("queue entry {queue_id} removed: done", queue_id=qid)
            return None
        if changed:
            try:
                if not await self._save(entry):
                    return None
            except Exception:
                self.log.failure("cannot save queue entry {queue_id}", queue_id=qid)
                return now + schedule.interval_for(1, relay.retry_intervals)
        nxt = entry_due(entry, now, relay.delay_warning_after)
        if nxt <= now:
            # Only a DSN is left and it could not be submitted: try it again later.
            nxt = now + schedule.interval_for(1, relay.retry_intervals)
        return nxt

    def _begin(
        self, qid: str, now: float, forced: bool
    ) -> tuple[QueueEntry, list[RecipientState], bytes | None] | None:
        """Blocking (in ``_file_batch``): load the entry and, if remote recipients
        are due, record the attempt before connecting out (style.md 4.13).

        The record is the attempt mark (no fsync; the module docstring says
        why that is enough); ``attempts`` and ``next_attempt`` are updated in
        memory and saved durably with the results.  A small message is read
        here too when the remote agent takes bytes (``takes_message``), so
        that the reactor thread opens no file.  Returns None if the entry is
        gone; raises ``_SaveFailed`` if the mark cannot be set, anything
        else if the entry cannot be read.
        """
        relay = self.config.relay
        entry = self.store.load(qid)
        if entry is None:
            return None
        due = [r for r in entry.recipients if not r.final and (forced or r.next_attempt <= now)]
        remote = [r for r in due if not r.local]
        if remote:
            expires = max(now, schedule.expires_at(entry.arrival, relay.max_queue_lifetime))
            for r in remote:
                r.attempts += 1
                r.next_attempt = min(schedule.next_attempt(r.attempts, relay.retry_intervals, now, self.rng), expires)
            try:
                self.store.mark_attempt(qid, min(r.next_attempt for r in remote))
            except Exception as e:
                raise _SaveFailed() from e
            if 0 < entry.size <= PRELOAD_MAX and getattr(self.remote, "takes_message", False):
                try:
                    return entry, due, fsutil.read_small(self.store.message_path(qid))
                except OSError:
                    pass  # the agent opens it itself and reports the error
        return entry, due, None

    def _file_batch(self, items: list[tuple]) -> list[Any]:
        """Blocking: the queue file work that piled up while the last batch ran,
        in one thread call (a hand-off costs the reactor thread more than one
        message's file work): ``(self._begin, id, now, forced)`` for entries
        that became due, ``(self._remove, id, durable)`` for finished ones."""
        results: list[Any] = []
        for f, *args in items:
            try:
                results.append(f(*args))
            except Exception as e:
                results.append(e)
        return results

    def _remove(self, qid: str, durable: bool) -> Any:
        """Blocking (in ``_file_batch``): remove a finished entry.

        Durable removals (a DSN was sent for the entry, so a resurrected entry
        would send another) fsync ``env/``; the others do not.
        """
        return self.store.remove(qid, sync=durable)

    async def _save(self, entry: QueueEntry) -> bool:
        """Save durably (a new envelope: any attempt mark goes with the old one)."""
        snapshot = QueueEntry.from_json(entry.to_json())  # the thread never sees later changes
        return bool(await self.run_blocking(save_unless_deleted, self.store, snapshot))

    async def _deliver(
        self,
        entry: QueueEntry,
        agent: Any,
        rcpts: list[RecipientState],
        domain: str | None,
        started: float,
        message: bytes | None = None,
    ) -> None:
        """One attempt for ``rcpts`` through ``agent``; records each result."""
        relay = self.config.relay
        if domain is not None:
            if not await self._slots.acquire(domain):
                return  # shutting down; the attempt mark is on disk
        try:
            try:
                if message is not None:
                    results = await agent.deliver(entry, list(rcpts), message=message)
                else:
                    results = await agent.deliver(entry, list(rcpts))
            except MailError as e:
                results = {r.address: e.reply for r in rcpts}
            except Exception:
                self.log.failure("delivery agent failed", queue_id=entry.id)
                results = {r.address: R_AGENT_ERROR for r in rcpts}
        finally:
            if domain is not None:
                self._slots.release(domain)
        now = self.clock.seconds()
        for r in rcpts:
            reply = results.get(r.address) or R_NO_RESULT
            host = getattr(reply, "host", "") or ""
            ip = getattr(reply, "ip", "") or ""
            where = f"{host}[{ip}]" if ip else host
            r.last_reply = str(reply)
            r.last_host = where
            r.history.append({"time": now, "host": where, "reply": str(reply)})
            del r.history[:-MAX_HISTORY]
            expired = False
            if reply.code < 400:
                r.status = DELIVERED
                status = "sent"
            elif reply.permanent:
                r.status = FAILED
                status = "bounced"
            else:
                status = "deferred"
                if r.local:
                    r.attempts += 1
                    r.next_attempt = schedule.next_attempt(r.attempts, relay.retry_intervals, now, self.rng)
                if schedule.expired(entry.arrival, now, relay.max_queue_lifetime):
                    r.status = FAILED
                    status = "bounced"
                    expired = True
                else:
                    r.next_attempt = min(
                        r.next_attempt, max(now, schedule.expires_at(entry.arrival, relay.max_queue_lifetime))
                    )
            mx = host or ("local" if r.local else "")
            delay = now - entry.arrival
            # One line per recipient and attempt, made here with an f-string: the
            # observer then formats a single field instead of eight (the structured
            # keys stay for observers that want them).
            self.log.info(
                "{line}",
                line=f"{entry.id}: to=<{r.address}> relay={mx} ip={ip} delay={delay:.1f} status={status}"
                f"{' (expired)' if expired else ''} ({r.last_reply})",
                queue_id=entry.id,
                rcpt=r.address,
                mx=mx,
                ip=ip,
                reply=r.last_reply,
                delay=delay,
                attempt_time=now - started,
                status=status,
                expired=expired,
                attempts=r.attempts,
            )

    # -- DSNs ---------------------------------------------------------------

    async def _notify(self, entry: QueueEntry, now: float) -> bool:
        """Send owed failure and delay DSNs; True if the entry changed."""
        relay = self.config.relay
        changed = False
        failed = [r for r in entry.recipients if r.status == FAILED and not r.notified]
        if failed:
            if not entry.sender:
                # RFC 5321 6.1 / RFC 3464: never bounce a bounce.
                for r in failed:
                    self.log.warn(
                        "{queue_id}: no DSN for failed recipient <{rcpt}> of a message from <>",
                        queue_id=entry.id,
                        rcpt=r.address,
                    )
                    r.notified = True
                changed = True
            elif await self._send_dsn(entry, failed, "failed", now):
                for r in failed:
                    r.notified = True
                changed = True
        pending = [r for r in entry.recipients if not r.final]
        if (
            pending
            and entry.sender
            and schedule.delay_warning_due(entry.arrival, now, relay.delay_warning_after, entry.delay_warned)
        ):
            if await self._send_dsn(entry, pending, "delayed", now):
                entry.delay_warned = True
                changed = True
        return changed

    async def _send_dsn(self, entry: QueueEntry, rcpts: list[RecipientState], action: str, now: float) -> bool:
        from mailstack.queue import dsn

        if self.intake is None:
            self.log.error("{queue_id}: no intake to send a DSN through", queue_id=entry.id)
            return False
        try:
            sender = parse_address(entry.sender)
        except AddressError:
            self.log.warn("{queue_id}: sender <{sender}> cannot get a DSN", queue_id=entry.id, sender=entry.sender)
            return True  # nobody to tell; do not retry forever
        try:
            headers = await self.run_blocking(read_headers, self.store.message_path(entry.id))
            message = dsn.build(
                hostname=self.config.hostname,
                entry=entry,
                recipients=rcpts,
                action=action,
                original_headers=headers,
                now=now,
                lifetime=self.config.relay.max_queue_lifetime,
                message_id=dsn.make_message_id(self.config.hostname, entry.id, now, self.rng),
            )
            destinations = self._dsn_destinations(sender)
            if not destinations:
                self.log.warn(
                    "{queue_id}: no DSN: sender <{sender}> is no local mailbox", queue_id=entry.id, sender=entry.sender
                )
                return True
            incoming = self.intake.begin(Envelope(sender=None, recipients=destinations, protocol="ESMTP"))
            incoming.write(message)
            dsn_id = await incoming.finish()
        except MailError as e:
            self.log.warn("{queue_id}: cannot submit the DSN: {reply}", queue_id=entry.id, reply=str(e.reply))
            return False
        except Exception:
            self.log.failure("{queue_id}: cannot submit the DSN", queue_id=entry.id)
            return False
        self.log.info(
            "{queue_id}: sender non-delivery notification {dsn_id} ({action}) for {rcpts}",
            queue_id=entry.id,
            dsn_id=dsn_id,
            action=action,
            rcpts=[r.address for r in rcpts],
        )
        return True

    def _dsn_destinations(self, sender: Any) -> tuple[Destination, ...]:
        """Where the DSN goes: a local sender through the router (aliases), so an
        unknown local sender (a forged MAIL FROM at the MX) gets nothing."""
        local = self.config.is_local_domain(sender.domain)
        if local and self.router is not None:
            try:
                return tuple(self.router.resolve(sender, True))
            except MailError:
                return ()
        return (Destination(address=sender, original=sender, local=local),)


def _chain(d: Deferred) -> Deferred:
    """A Deferred that fires when ``d`` does, without taking its result."""
    out: Deferred = Deferred()

    def fire(result: Any) -> Any:
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(fire)
    return out

