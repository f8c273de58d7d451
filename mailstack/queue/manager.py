# -*- test-case-name: tests.queue.test_manager -*-
"""The queue manager: when each queued message is tried, and by which agent.

Time plus concurrency over the files of ``queue/store.py`` (Postfix's qmgr):

* ``startService`` runs ``store.recover()``, then the start-up scan
  (``queue/scan.py``) in threads, and builds a heap of ``(due, queue_id)``
  from the envelopes alone, never reading a message body.  One ``IDelayedCall`` is armed for the earliest entry.
* ``kick(id)`` (from the intake after each commit, and from ``flush``) makes an
  entry due now.  Local recipients are delivered at once through the local agent;
  remote ones when their ``next_attempt`` has come.
* Before connecting out, the attempt is recorded, so a crash in the middle never
  causes a hot retry loop: ``store.mark_attempt`` sets the
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
  recipients get one RFC 3464 DSN per entry and round (``queue/bounce.py``),
  submitted through the intake with sender ``<>``.  What a reply does to a
  recipient (status, retry time, expiry) is ``queue/outcome.py``.
* An entry leaves the queue only when ``entry.done``.
* The ``queue/flush`` trigger file (``mailstack queue flush``) is polled about
  once a second; when present every entry is retried now.
* Saves take a lock on the entry (``queue.locks.entry_lock``), as does ``mailstack
  queue delete``, so a deletion beside the running server is never undone by a
  save.
* Stopping waits up to ``stop_timeout`` for the rounds in progress, then
  aborts the agents' connections (``abort_all``).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mailstack import logsafe
from mailstack.batching import GroupCommit
from mailstack.config import Config
from mailstack.delivery import replies as OR
from mailstack.errors import MailError, Reply
from mailstack.interfaces import IDeliveryAgent, IIntake, IMetrics, IQueueKicker, IQueueStore, IRouter
from mailstack.metrics import NoMetrics, QueueStats
from mailstack.queue import outcome, schedule
from mailstack.queue.bounce import Bouncer
from mailstack.queue.entry import FAILED, QueueEntry, RecipientState
from mailstack.queue.locks import save_unless_deleted
from mailstack.queue.scan import scan_schedule
from mailstack.queue.slots import Slots
from mailstack.queue.store import id_time
from mailstack.storage import fsutil

SCAN_BATCH = 5000  # envelopes read per thread call at start-up
PRELOAD_MAX = 64 * 1024  # messages up to this size are read with the envelope and relayed from memory


class _SaveFailed(Exception):
    """The attempt mark before connecting out could not be set (the entry is not attempted)."""


class _Held(Exception):
    """The entry is held (``mailstack queue hold``): not tried until released."""


@implementer(IQueueKicker)
class QueueManager(Service):
    """A Service on the shared reactor; see the module docstring."""

    log = Logger()
    name = "queue-manager"

    def __init__(
        self,
        store: IQueueStore,
        local: IDeliveryAgent,
        remote: IDeliveryAgent,
        clock: IReactorTime,
        config: Config,
        run_blocking: Callable[..., Deferred],
        intake: IIntake | None = None,
        *,
        router: IRouter | None = None,
        rng: random.Random | None = None,
        flush_poll: float = 1.0,
        max_active: int = 1000,
        stop_timeout: float | None = None,
        metrics: IMetrics | None = None,
    ) -> None:
        self.store = store
        self.local = local
        self.remote = remote
        self.clock = clock
        self.config = config
        self.run_blocking = run_blocking
        self.metrics: IMetrics = metrics if metrics is not None else NoMetrics()
        self.metrics.watch_queue(self.queue_stats)
        self.rng = rng if rng is not None else random.Random()
        # DSNs; the router makes DSNs to local senders follow aliases.
        self.bounces = Bouncer(store, config, run_blocking, self.rng, router, intake)
        self.flush_poll = flush_poll
        self.max_active = max(1, max_active)
        self.stop_timeout = stop_timeout if stop_timeout is not None else float(config.smtp.shutdown_grace)
        relay = config.relay
        self._slots = Slots(relay.max_connections, relay.max_per_domain)
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}  # queue_id -> the live heap key
        self._forced: set[str] = set()  # flushed: try remote recipients regardless of next_attempt
        self._active: dict[str, Deferred] = {}  # queue_id -> Deferred firing when its round ends
        self._again: set[str] = set()  # kicked while active: look again right after
        self._held: set[str] = set()  # held entries, kept aside until a release kicks them
        self._files = GroupCommit(run_blocking, self._file_batch)  # loads and removals, see _file_batch
        self._timer: IDelayedCall | None = None
        self._poller: LoopingCall | None = None
        self._stopping = False
        self._loaded: Deferred | None = None

    @property
    def intake(self) -> IIntake | None:
        """Where DSNs are submitted; set after construction (the intake needs us as kicker)."""
        return self.bounces.intake

    @intake.setter
    def intake(self, intake: IIntake | None) -> None:
        self.bounces.intake = intake

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
        ids = await self.run_blocking(store.ids)
        for i in range(0, len(ids), SCAN_BATCH):
            if self._stopping:
                return
            found = await self.run_blocking(scan_schedule, store, ids[i : i + SCAN_BATCH], now, warn)
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
            if due == math.inf:  # held
                self._held.add(qid)
            elif qid not in self._due and qid not in self._active:
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
            agent.close_idle()  # no more connection reuse; idle sessions say QUIT
        if not self._active:
            return succeed(None)
        done: Deferred = Deferred()
        pending = DeferredList([_chain(d) for d in self._active.values()], consumeErrors=True)

        def grace_over() -> None:
            # Attempts still running are dropped: their recipients stay pending
            # (the attempt mark is on disk) and are retried after the restart.
            for agent in (self.remote, self.local):
                agent.abort_all()
            if not done.called:
                done.callback(None)

        timeout = self.clock.callLater(self.stop_timeout, grace_over)

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
        d = self.run_blocking(self._requests)

        def check(requested: tuple[bool, list[str]]) -> None:
            flush, kicks = requested
            if self._stopping:
                return
            for qid in kicks:  # released or deleted: look again
                self._held.discard(qid)
                self.kick(qid)
            if flush:
                self.flush()

        d.addCallback(check)
        d.addErrback(lambda f: self.log.failure("flush trigger check failed", f))
        return d

    def _requests(self) -> tuple[bool, list[str]]:
        """Blocking: the admin command's flush and kick requests."""
        return self.store.flush_requested(), self.store.kicks_requested()

    # -- the schedule -------------------------------------------------------

    def queue_stats(self) -> QueueStats:
        """Entries and the oldest one's age, from the in-memory schedule (at each
        metrics scrape; no disk access).  A queue id starts with its creation
        time in hex microseconds (``QueueStore.new_id``)."""
        ids = self._due.keys() | self._active.keys() | self._held
        times = [t for t in map(id_time, ids) if t is not None]
        oldest = min(times, default=None)
        return QueueStats(len(ids), max(0.0, self.clock.seconds() - oldest) if oldest is not None else 0.0)

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
        except _Held:
            self._held.add(qid)
            self.log.info("queue entry {queue_id} is held", queue_id=qid)
            return None
        except Exception:
            # Deleted by `queue delete`, or unreadable (moved to corrupt/ by load()).
            self.log.info("queue entry {queue_id} is gone", queue_id=qid)
            return None
        if begun is None:
            return None
        entry, due, message, inline = begun
        local = [r for r in due if r.local]
        remote = [r for r in due if not r.local]

        work = []
        if local:
            work.append(self._deliver(entry, self.local, local, None, now, message if inline else None))
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
        changed |= await self.bounces.notify(entry, now)
        if entry.done:
            try:
                # Without a DSN involved, the removal need not be durable: a
                # crash that undoes it only means a second delivery, never none.
                await self._files.submit((self._remove, entry.id, bounced, not inline))
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
        nxt = schedule.entry_due(entry, now, relay.delay_warning_after)
        if nxt <= now:
            # Only a DSN is left and it could not be submitted: try it again later.
            nxt = now + schedule.interval_for(1, relay.retry_intervals)
        return nxt

    def _begin(
        self, qid: str, now: float, forced: bool
    ) -> tuple[QueueEntry, list[RecipientState], bytes | None, bool] | None:
        """Blocking (in ``_file_batch``): load the entry and, if remote recipients
        are due, record the attempt before connecting out (see the module docstring).

        The record is the attempt mark (no fsync; the module docstring says
        why that is enough); ``attempts`` and ``next_attempt`` are updated in
        memory and saved durably with the results.  The message comes with
        the entry when it is inside the envelope (``inline``; then it is the
        only copy and goes to both agents); else a small one is read here
        when the remote agent takes bytes (``takes_message``), so that the
        reactor thread opens no file.  Returns None if the entry is gone;
        raises ``_SaveFailed`` if the mark cannot be set, anything else if
        the entry cannot be read.
        """
        relay = self.config.relay
        entry, message = self.store.load_message(qid)
        inline = message is not None
        if entry.held:
            raise _Held()
        due = [r for r in entry.recipients if not r.final and (forced or r.next_attempt <= now)]
        remote = [r for r in due if not r.local]
        if remote:
            expires = max(now, schedule.expires_at(entry.expiry_base, relay.max_queue_lifetime))
            for r in remote:
                r.attempts += 1
                r.next_attempt = min(schedule.next_attempt(r.attempts, relay.retry_intervals, now, self.rng), expires)
            try:
                self.store.mark_attempt(qid, min(r.next_attempt for r in remote))
            except Exception as e:
                raise _SaveFailed() from e
            if not inline and 0 < entry.size <= PRELOAD_MAX and self.remote.takes_message:
                try:
                    message = fsutil.read_small(self.store.message_path(qid))
                except OSError:
                    pass  # the agent opens it itself and reports the error
        return entry, due, message, inline

    def _file_batch(self, items: list[tuple]) -> list[Any]:
        """Blocking: the queue file work that piled up while the last batch ran,
        in one thread call (a hand-off costs the reactor thread more than one
        message's file work): ``(self._begin, id, now, forced)`` for entries
        that became due, ``(self._remove, id, durable, message_file)`` for
        finished ones."""
        results: list[Any] = []
        for f, *args in items:
            try:
                results.append(f(*args))
            except Exception as e:
                results.append(e)
        return results

    def _remove(self, qid: str, durable: bool, message_file: bool) -> Any:
        """Blocking (in ``_file_batch``): remove a finished entry.

        Durable removals (a DSN was sent for the entry, so a resurrected entry
        would send another) fsync ``env/``; the others do not.
        """
        return self.store.remove(qid, sync=durable, message_file=message_file)

    async def _save(self, entry: QueueEntry) -> bool:
        """Save durably (a new envelope: any attempt mark goes with the old one)."""
        snapshot = QueueEntry.from_json(entry.to_json())  # the thread never sees later changes
        return bool(await self.run_blocking(save_unless_deleted, self.store, snapshot))

    async def _deliver(
        self,
        entry: QueueEntry,
        agent: IDeliveryAgent,
        rcpts: list[RecipientState],
        domain: str | None,
        started: float,
        message: bytes | None = None,
    ) -> None:
        """One attempt for ``rcpts`` through ``agent``; records each result (``queue/outcome.py``)."""
        relay = self.config.relay
        if domain is not None:
            if not await self._slots.acquire(domain):
                return  # shutting down; the attempt mark is on disk
        try:
            try:
                results = await agent.deliver(entry, list(rcpts), message=message)
            except MailError as e:
                results = {r.address: e.reply for r in rcpts}
            except Exception:
                self.log.failure("delivery agent failed", queue_id=entry.id)
                results = {r.address: OR.LOCAL_ERROR for r in rcpts}
        finally:
            if domain is not None:
                self._slots.release(domain)
        now = self.clock.seconds()
        for r in rcpts:
            reply: Reply = results.get(r.address) or OR.NO_RESULT
            done = outcome.record(
                r, reply, now, entry.expiry_base, relay.retry_intervals, relay.max_queue_lifetime, self.rng
            )
            mx = logsafe.escape(done.host) if done.host else ("local" if r.local else "")
            shown = logsafe.escape(r.last_reply)  # the remote server's words
            delay = now - entry.arrival
            kind = "local" if r.local else "remote"
            if done.status == outcome.SENT:
                self.metrics.delivered(kind, delay)
            elif done.status == outcome.DEFERRED:
                self.metrics.deferred(kind)
            else:
                self.metrics.bounced(kind)
            # One line per recipient and attempt, made here with an f-string: the
            # observer then formats a single field instead of eight (the structured
            # keys stay for observers that want them).
            self.log.info(
                "{line}",
                line=f"{entry.id}: to=<{r.address}> relay={mx} ip={done.ip} delay={delay:.1f} status={done.status}"
                f"{' (expired)' if done.expired else ''} ({shown})",
                queue_id=entry.id,
                rcpt=r.address,
                mx=mx,
                ip=done.ip,
                reply=shown,
                delay=delay,
                attempt_time=now - started,
                status=done.status,
                expired=done.expired,
                attempts=r.attempts,
            )


def _chain(d: Deferred) -> Deferred:
    """A Deferred that fires when ``d`` does, without taking its result."""
    out: Deferred = Deferred()

    def fire(result: Any) -> Any:
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(fire)
    return out

