# -*- test-case-name: tests.storage.test_dirsync -*-
"""Directory fsyncs shared by the pool threads that need the same one at once.

A file renamed into a directory is durable only once the directory is
fsynced (POSIX gives no other guarantee; the Maildir and queue commit
protocols both rely on it).  A commit runs whole in one pool thread (write,
fsync, rename, directory fsync): one thread hand-off per message, which is
what the reactor thread pays for.  When several threads commit into one
directory at nearly the same time, a single fsync issued after all their
renames covers them all, so they share it: group commit among the threads,
with no batch to gather on the reactor thread and no timer.

A round is the fsync that covers every thread that joined it.  A thread
joins the round that has not started yet; if no round is running it starts
that round itself, otherwise it waits for the running one to end and then
either finds its own round done by another thread or starts it.  A round
that started before a thread's rename never counts for that thread.  An
fsync error is raised in every thread of its round.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

from mailstack.storage import fsutil


class _Round:
    """One fsync of a directory and the threads waiting for it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None


class _Directory:
    __slots__ = ("waiting", "running", "users")

    def __init__(self) -> None:
        self.waiting = _Round()  # the round new arrivals join; it starts after them
        self.running = False
        self.users = 0  # threads inside sync() for this directory


class DirSyncs:
    """``sync(path)``: ``path``'s entries durable, the fsync shared with
    concurrent callers (see the module docstring).  Blocks; pool threads only."""

    def __init__(self, fsync_dir: Callable[[str], None] | None = None) -> None:
        # Looked up at each call by default, so that tests patching fsutil's
        # indirections see the fsync.
        self._fsync_dir = fsync_dir
        self._lock = threading.Condition()
        self._directories: dict[str, _Directory] = {}
        self.fsyncs = 0  # rounds run (for tests and diagnostics)

    def sync(self, path: str) -> None:
        with self._lock:
            directory = self._directories.get(path)
            if directory is None:
                directory = self._directories[path] = _Directory()
            directory.users += 1
            mine = directory.waiting
            try:
                while not mine.done:
                    if directory.running:
                        self._lock.wait()
                        continue
                    self._run(path, directory)
            finally:
                directory.users -= 1
                if not directory.users:
                    del self._directories[path]  # nothing kept for an idle directory
        if mine.error is not None:
            raise copy.copy(mine.error)  # each thread raises (and tracebacks) its own

    def _run(self, path: str, directory: _Directory) -> None:
        """Run the waiting round (the lock is held on entry and on return)."""
        round_, directory.waiting = directory.waiting, _Round()
        directory.running = True
        self.fsyncs += 1
        self._lock.release()
        try:
            (self._fsync_dir or fsutil.fsync_dir)(path)
        except BaseException as e:
            round_.error = e
        finally:
            self._lock.acquire()
            directory.running = False
            round_.done = True
            self._lock.notify_all()
