# -*- test-case-name: tests.procs.test_worker -*-
"""A worker's log events to the master: JSON lines on a pipe, one write per reactor turn.

Writing (and flushing) each event as it comes cost a worker a system call per
log line and woke the master for each; under load that was a quarter of a
worker's reactor time.  Events are serialised at once (``eventAsJSON``, so
they keep their fields and failures) and written together when the reactor
turn ends, or at once when they come from another thread, before the reactor
runs or after it stopped.  A worker killed with SIGKILL loses at most the
lines of its last turn; the master re-emits each line (``master.WorkerProcess``).
"""

from __future__ import annotations

import threading
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, eventAsJSON
from twisted.python.threadable import isInIOThread
from zope.interface import implementer


@implementer(ILogObserver)
class LogPipe:
    """``ILogObserver`` writing ``eventAsJSON`` lines to ``out`` (a binary file), batched."""

    def __init__(self, out: IO[bytes], reactor: Any) -> None:
        self.out = out
        self.reactor = reactor
        self._lock = threading.Lock()
        self._lines: list[bytes] = []
        self._scheduled = False

    def __call__(self, event: LogEvent) -> None:
        line = (eventAsJSON(event) + "\n").encode("utf-8")
        with self._lock:
            self._lines.append(line)
            if self._scheduled:
                return
            batch = isInIOThread() and self.reactor.running
            self._scheduled = batch
        if batch:
            self.reactor.callLater(0, self.flush)
        else:
            self.flush()

    def flush(self) -> None:
        """Write what has gathered (a reactor turn's lines) in one write."""
        with self._lock:
            data = b"".join(self._lines)
            self._lines.clear()
            self._scheduled = False
            if data:
                try:
                    self.out.write(data)
                    self.out.flush()
                except OSError:  # the master is gone; we are stopping
                    pass
