# -*- test-case-name: tests.test_logbatch -*-
"""Log lines written once per reactor turn instead of once per event.

twistd's file observer writes and flushes every event: a system call per log
line, which under load was several percent of the reactor's time in one
process and a quarter of a session worker's (whose lines go to the master
through a pipe, waking it for each).  ``BatchedObserver`` formats each event
at once (so nothing it refers to can change meanwhile) and writes the lines
of one reactor turn together when the turn ends.  Events from another thread,
and those before the reactor runs or after it stopped, are written at once.
A process killed with SIGKILL loses at most the lines of its last turn.

``classic_text`` is twistd's text format (``textFileLogObserver``) with the
time stamp formatted once per second instead of once per event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEventAsClassicLogText, formatTime
from twisted.python.threadable import isInIOThread
from zope.interface import implementer


@implementer(ILogObserver)
class BatchedObserver:
    """Writes ``format_event(event)`` (a line with its newline, or None) to ``out``, batched per turn."""

    def __init__(self, out: IO[str], format_event: Callable[[LogEvent], str | None], reactor: Any) -> None:
        self.out = out
        self.format_event = format_event
        self.reactor = reactor
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._scheduled = False

    def __call__(self, event: LogEvent) -> None:
        line = self.format_event(event)
        if not line:
            return
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
        """Write the lines gathered so far in one write."""
        with self._lock:
            data = "".join(self._lines)
            self._lines.clear()
            self._scheduled = False
            if data:
                try:
                    self.out.write(data)
                    self.out.flush()
                except OSError:  # a worker whose master is gone: it is stopping anyway
                    pass


def classic_text() -> Callable[[LogEvent], str | None]:
    """twistd's text log format, its time stamp formatted once per second."""
    last: list[Any] = [None, ""]

    def stamp(when: float | None) -> str:
        second = None if when is None else int(when)
        if second != last[0]:
            last[0], last[1] = second, formatTime(when)
        return str(last[1])

    return lambda event: formatEventAsClassicLogText(event, formatTime=stamp)
