"""Fault injection for the durable writers: make the k-th OS call of fsutil fail.

``storage/fsutil.py`` routes ``open``, ``write``, ``fsync``, ``rename`` and
``unlink`` through module attributes; the Maildir store and the queue store
call them through those attributes too.  ``Faults`` replaces them with
wrappers that count the calls and raise at step ``fail_at``:

* ``crash=False``: only that call fails (an I/O error or a full disk); the code
  under test runs its clean-up, which must leave nothing half-written.
* ``crash=True``: that call and every later one fail, as if the process died
  there: nothing more reaches the disk, clean-up included.  What is left is
  what a restart's ``recover()`` finds.
"""

from __future__ import annotations

import errno
import os

from mailstack.storage import fsutil
from tests.support.dirs import scratch_path  # noqa: F401 (the storage, queue and intake tests import it from here)

CALLS = ("_open", "_write", "_fsync", "_rename", "_unlink")


class Faults:
    """Counts fsutil's OS calls and fails from the ``fail_at``-th one (1-based)."""

    def __init__(self, testcase, fail_at: int | None = None, error: int = errno.EIO, crash: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at
        self.error = error
        self.crash = crash
        self._saved = {name: getattr(fsutil, name) for name in CALLS}
        for name, real in self._saved.items():
            setattr(fsutil, name, self._wrap(name, real))
        testcase.addCleanup(self.restore)

    def restore(self) -> None:
        """Put the real calls back (also done at the test's clean-up)."""
        for name, real in self._saved.items():
            setattr(fsutil, name, real)

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            self.calls.append(name)
            step = len(self.calls)
            if self.fail_at is not None and (step == self.fail_at or (self.crash and step > self.fail_at)):
                raise OSError(self.error, os.strerror(self.error))
            return real(*args, **kwargs)

        return call


def count_steps(testcase, action) -> list[str]:
    """The OS calls ``action()`` makes when nothing fails."""
    faults = Faults(testcase)
    try:
        action()
    finally:
        faults.restore()
    return faults.calls
