# -*- test-case-name: tests.test_logbatch -*-
"""Log lines written once per reactor turn instead of once per event.

twistd's file observer writes and flushes every event: a system call per log
line, which under load was several percent of the reactor's time in one
process and a quarter of a session worker's (whose lines go to the master
through a pipe, waking it for each).  ``BatchedObserver`` formats each event
at once (so nothing it refers to can change meanwhile) and writes the lines
of one reactor turn together when the turn ends (lines from other threads
join the batch); those before the reactor runs or after it stopped are
written at once.  ``write`` adds lines formatted elsewhere: the master
passes its session workers' lines through without parsing them.
A process killed with SIGKILL loses at most the lines of its last turn.

``classic_text`` is twistd's text format (``textFileLogObserver``) with the
time stamp formatted once per second instead of once per event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEventAsClassicLogText, formatTime
from zope.interface import implementer


@implementer(ILogObserver)
class BatchedObserver:
    """Writes ``format_event(event)`` (a line with its newline, or None) to ``out``, batched per turn."""

    def __init__(self, out: IO[str], format_event: Callable[[LogEvent], str | None], reactor: Any) -> None:
        self.out = out
        self.format_event = format_event
        self.reactor = reactor
        # Re-entrant: a signal handler (SIGTERM, SIGINT) runs in the main thread
        # between two bytecodes, possibly while this thread holds the lock, and
        # logs; a plain lock would deadlock the process there.
        self._lock = threading.RLock()
        self._lines: list[str] = []
        self._scheduled = False

    def __call__(self, event: LogEvent) -> None:
        line = self.format_event(event)
        if line:
            self.write(line)

    def write(self, text: str) -> None:
        """Add ``text``, whole lines already formatted (a session worker's), to the batch."""
        with self._lock:
            self._lines.append(text)
            if self._scheduled:
                return
            batch = self._scheduled = bool(self.reactor.running)
        if batch:
            # callFromThread, not callLater: safe from other threads and from
            # signal handlers, and run at the end of the current reactor turn.
            self.reactor.callFromThread(self.flush)
        else:
            self.flush()

    def flush(self) -> None:
        """Write the lines gathered so far, in one write per batch."""
        with self._lock:
            self._scheduled = False
            while self._lines:  # a signal handler may add lines while we write
                lines, self._lines = self._lines, []
                try:
                    self.out.write("".join(lines))
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
