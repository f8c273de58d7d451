"""Tests for mailstack.threadpool: calls run in the pool's threads, results come
back through ``callFromThread``, and ``stop()`` finishes what was queued.

No sleeps: ``stop()`` joins the threads, after which every queued call has run
and its ``callFromThread`` was recorded; the test then runs those on its own
thread, as the reactor would.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailstack import threadpool
from mailstack.threadpool import ThreadPool


class FakeOS:
    """The scheduling calls of ``os`` that the pool makes: recorded, or refused like a sandbox does."""

    SCHED_BATCH = 3

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()

    def sched_param(self, priority: int) -> int:
        return priority

    def sched_setscheduler(self, pid: int, policy: int, param: int) -> None:
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")
        with self._lock:
            self.calls.append((pid, policy, threading.current_thread().name))


class RecordingReactor:
    """``callFromThread`` only: records the calls for the test to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple]] = []
        self._lock = threading.Lock()

    def callFromThread(self, f: Any, *args: Any) -> None:
        with self._lock:
            self.calls.append((f, args))

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class ThreadPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = RecordingReactor()
        self.pool = ThreadPool(self.reactor, 3, "test")
        self.addCleanup(self.pool.stop)

    def test_resultOnReactorThread(self) -> None:
        """The result reaches the Deferred only through callFromThread, and the call ran in a pool thread."""
        d = self.pool.run(lambda a, b=0: (threading.current_thread().name, a + b), 1, b=2)
        self.pool.start()
        self.pool.stop()
        self.assertNoResult(d)
        self.reactor.run_calls()
        name, value = self.successResultOf(d)
        self.assertEqual(value, 3)
        self.assertTrue(name.startswith("PoolThread-test-"))

    def test_exceptionIsFailure(self) -> None:
        """An exception in the call fails the Deferred with that exception."""

        def boom() -> None:
            raise OSError(28, "No space left on device")

        d = self.pool.run(boom)
        self.pool.start()
        self.pool.stop()
        self.reactor.run_calls()
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, 28)

    def test_queuedBeforeStartRunsAtStart(self) -> None:
        """Calls made before start() wait for it."""
        ran: list[int] = []
        self.pool.run(ran.append, 1)
        self.pool.stop()  # not started: nothing to stop, nothing runs
        self.assertEqual(ran, [])
        self.pool.start()
        self.pool.stop()
        self.assertEqual(ran, [1])

    def test_stopFinishesQueuedCalls(self) -> None:
        """stop() returns only after every call queued before it has run (an fsync in progress completes)."""
        ran: list[int] = []
        lock = threading.Lock()

        def work(i: int) -> None:
            with lock:
                ran.append(i)

        ds = [self.pool.run(work, i) for i in range(20)]
        self.pool.start()
        self.pool.stop()
        self.assertEqual(sorted(ran), list(range(20)))
        self.assertFalse(self.pool.started)
        self.reactor.run_calls()
        for d in ds:
            self.assertIsNone(self.successResultOf(d))

    def test_stopTwice(self) -> None:
        """A second stop() is harmless; start() after stop() runs threads again."""
        self.pool.start()
        self.assertTrue(self.pool.started)
        self.pool.stop()
        self.pool.stop()
        self.pool.start()
        d = self.pool.run(lambda: 7)
        self.pool.stop()
        self.reactor.run_calls()
        self.assertEqual(self.successResultOf(d), 7)

    def test_workersAskForBatchScheduling(self) -> None:
        """Each pool thread asks for SCHED_BATCH for itself (so a woken worker does not preempt the reactor)."""
        fake = FakeOS()
        self.patch(threadpool, "os", fake)
        self.pool.start()
        self.pool.stop()
        self.assertEqual(len(fake.calls), 3)
        self.assertEqual({(pid, policy) for pid, policy, _ in fake.calls}, {(0, FakeOS.SCHED_BATCH)})  # 0: itself
        self.assertTrue(all(name.startswith("PoolThread-test-") for _, _, name in fake.calls))

    def test_batchSchedulingRefused(self) -> None:
        """Where the OS refuses SCHED_BATCH (a sandbox), the pool still runs calls."""
        self.patch(threadpool, "os", FakeOS(refuse=True))
        d = self.pool.run(lambda: 7)
        self.pool.start()
        self.pool.stop()
        self.reactor.run_calls()
        self.assertEqual(self.successResultOf(d), 7)

    def test_noBatchScheduling(self) -> None:
        """Where the OS has no SCHED_BATCH (not Linux), the pool still runs calls."""
        self.patch(threadpool, "os", object())
        d = self.pool.run(lambda: 7)
        self.pool.start()
        self.pool.stop()
        self.reactor.run_calls()
        self.assertEqual(self.successResultOf(d), 7)
