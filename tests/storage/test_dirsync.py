"""DirSyncs: directory fsyncs shared by the threads that need one at the same time."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from mailstack.storage.dirsync import DirSyncs

WAIT = 10.0  # a bound on waiting for another thread, never reached when the code is right


class CountingCondition(threading.Condition):
    """A Condition that lets a test wait until ``n`` threads wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self._changed = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        with self._changed:
            self.waiting += 1
            self._changed.notify_all()
        try:
            return super().wait(timeout)
        finally:
            with self._changed:
                self.waiting -= 1

    def until_waiting(self, n: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.waiting >= n, WAIT):
                raise AssertionError(f"{self.waiting} threads waiting, expected {n}")


class HeldFsyncs:
    """A stand-in for ``fsutil.fsync_dir``: records each call; the first call
    to a path in ``hold`` blocks until ``release()``; ``fail`` maps a call
    number (1-based) to the error it raises."""

    def __init__(self, hold: tuple[str, ...] = (), fail: dict[int, BaseException] | None = None) -> None:
        self.calls: list[str] = []
        self._hold = set(hold)
        self._fail = fail or {}
        self.started = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, path: str) -> None:
        with self._lock:
            self.calls.append(path)
            number = len(self.calls)
            held = path in self._hold
            self._hold.discard(path)
        if held:
            self.started.set()
            if not self._released.wait(WAIT):
                raise AssertionError("never released")
        if number in self._fail:
            raise self._fail[number]

    def release(self) -> None:
        self._released.set()


class Threads:
    """Runs callables in threads and keeps what each raised."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self.errors: dict[str, BaseException | None] = {}

    def start(self, name: str, f: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                f()
            except BaseException as e:
                self.errors[name] = e
            else:
                self.errors[name] = None

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def join(self) -> None:
        for t in self._threads:
            t.join(WAIT)
            if t.is_alive():
                raise AssertionError(f"{t.name} still running")


def instrumented(fsync: HeldFsyncs) -> tuple[DirSyncs, CountingCondition]:
    syncs = DirSyncs(fsync)
    condition = syncs._lock = CountingCondition()
    return syncs, condition


class DirSyncsTests(SynchronousTestCase):
    def test_aloneOneFsync(self) -> None:
        """A caller with nobody else around fsyncs its directory once and keeps no state for it."""
        fsync = HeldFsyncs()
        syncs = DirSyncs(fsync)
        syncs.sync("/q/env")
        syncs.sync("/q/env")
        self.assertEqual(fsync.calls, ["/q/env", "/q/env"])
        self.assertEqual(syncs._directories, {})

    def test_arrivalsDuringAnFsyncShareTheNextOne(self) -> None:
        """Threads that renamed while an fsync ran are not covered by it; the next fsync covers all of them."""
        fsync = HeldFsyncs(hold=("/q/env",))
        syncs, condition = instrumented(fsync)
        threads = Threads()
        threads.start("first", lambda: syncs.sync("/q/env"))
        self.assertTrue(fsync.started.wait(WAIT))
        for name in ("second", "third", "fourth"):
            threads.start(name, lambda: syncs.sync("/q/env"))
        condition.until_waiting(3)
        self.assertEqual(fsync.calls, ["/q/env"])  # nobody returned on the fsync that began before them
        fsync.release()
        threads.join()
        self.assertEqual(fsync.calls, ["/q/env", "/q/env"])
        self.assertEqual(threads.errors, {"first": None, "second": None, "third": None, "fourth": None})
        self.assertEqual((syncs.fsyncs, syncs._directories), (2, {}))

    def test_directoriesDoNotWaitForEachOther(self) -> None:
        """An fsync of another directory runs while one is held."""
        fsync = HeldFsyncs(hold=("/mail/a/new",))
        syncs = DirSyncs(fsync)
        threads = Threads()
        threads.start("a", lambda: syncs.sync("/mail/a/new"))
        self.assertTrue(fsync.started.wait(WAIT))
        syncs.sync("/mail/b/new")  # returns although a's fsync is still held
        self.assertEqual(fsync.calls, ["/mail/a/new", "/mail/b/new"])
        fsync.release()
        threads.join()
        self.assertEqual(threads.errors, {"a": None})

    def test_failedFsyncRaisesInEveryThreadOfItsRound(self) -> None:
        """The error of a shared fsync reaches every thread it was for, each with its own exception object;
        the thread of the round before is not affected."""
        fsync = HeldFsyncs(hold=("/q/env",), fail={2: OSError(errno.EIO, "I/O error")})
        syncs, condition = instrumented(fsync)
        threads = Threads()
        threads.start("first", lambda: syncs.sync("/q/env"))
        self.assertTrue(fsync.started.wait(WAIT))
        threads.start("second", lambda: syncs.sync("/q/env"))
        threads.start("third", lambda: syncs.sync("/q/env"))
        condition.until_waiting(2)
        fsync.release()
        threads.join()
        self.assertIsNone(threads.errors["first"])
        second, third = threads.errors["second"], threads.errors["third"]
        assert isinstance(second, OSError) and isinstance(third, OSError)
        self.assertEqual((second.errno, third.errno), (errno.EIO, errno.EIO))
        self.assertIsNot(second, third)
        syncs.sync("/q/env")  # the next round is a fresh fsync
        self.assertEqual(len(fsync.calls), 3)
