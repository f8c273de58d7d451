# -*- test-case-name: tests.test_jsonlog -*-
"""``log.format = "json"``: one JSON object per line (JSON Lines), for log shippers.

Each line is an object with ``time`` (ISO 8601, UTC, milliseconds), ``level``
(``debug`` ... ``critical``), ``namespace`` (the emitting module), ``text``
(the event formatted as the text log shows it) and then the event's own keys
(``queue_id``, ``peer``, ``user``, ...), converted to JSON values: bytes are
decoded (invalid UTF-8 backslash-escaped), containers recursively, anything
else by ``str()``; a failure becomes its traceback text under ``failure``.
Twisted's bookkeeping keys (``log_*``, and the duplicates of legacy
``twisted.python.log`` events) are left out.  An own key that collides with one
of the five fixed keys keeps its value under the name with ``_`` appended.

Twisted's ``jsonFileLogObserver`` is not used: it writes RFC 7464 record
separators and serialises every key, logger objects included.

Escaping: ``json.dumps`` with ``ensure_ascii`` escapes every control character
and everything outside ASCII, so peer-supplied text (a HELO name, a login)
cannot break a line or reach a terminal as an escape sequence.

**With twistd.**  twistd picks its log observer in ``AppLogger.start``: a
``--logger`` factory if one was given, else the application's ``ILogObserver``
component, else a text observer on ``--logfile`` (stdout with ``-n`` and no
``--logfile``, or ``-``).  A ``--logger`` factory is called without arguments,
so it cannot know ``--logfile``; the component can be set by the service that
twistd attaches to the application, before logging begins.  ``for_twistd``
does that: it wraps the service tree in ``LogApplication``, which sets the
component to our observer (JSON, or twistd's text format, batched per
reactor turn by ``logbatch``) writing where twistd's text observer would have
(``twistd_output``: the same stdout / ``--logfile`` choice, and SIGUSR1 reopens
a log file as twistd's does).  An explicit ``--logger`` or ``--syslog`` wins.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.application import app
from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import ILogObserver, LogEvent, formatEvent
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from mailstack import lognoise
from mailstack.logbatch import BatchedObserver, classic_text

# Keys a legacy ``twisted.python.log`` event carries besides its ``log_*`` twins.
_LEGACY = frozenset({"message", "isError", "system", "time", "format", "why", "failure"})

_MAX_DEPTH = 4


def _safe(value: Any, depth: int = 0) -> Any:
    """``value`` as something ``json.dumps`` writes as valid JSON."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN is not JSON
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, Failure):
        return value.getTraceback()
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {str(k): _safe(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [_safe(v, depth + 1) for v in value]
    try:
        return str(value)
    except Exception:  # noqa: BLE001 -- a broken __str__ must not cost the log line
        return object.__repr__(value)


def _iso_time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_as_json(event: LogEvent) -> str:
    """One log event as one line of JSON (without the newline)."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = _safe(failure)
    legacy = event.get("log_namespace") == "log_legacy"
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY):
            continue
        name = key
        while name in record:
            name += "_"
        record[name] = _safe(value)
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def line_format(log_format: str) -> Callable[[LogEvent], str | None]:
    """How an event becomes a log line (with its newline) in ``[log] format``:
    twistd's text line ("text") or ``event_as_json`` ("json")."""
    if log_format == "text":
        return classic_text()
    return lambda event: event_as_json(event) + "\n"


def twistd_output(server_options: Mapping[str, Any]) -> IO[str] | None:
    """Where twistd would write its text log, or None if the operator chose a
    ``--logger`` or ``--syslog`` (then twistd's choice stands).

    Mirrors ``twisted.scripts._twistd_unix.UnixAppLogger``: ``--logfile=-`` or
    no ``--logfile`` with ``--nodaemon`` is stdout; otherwise the named file
    (``twistd.log`` by default), reopened on SIGUSR1 for log rotation.
    """
    if server_options.get("logger") or server_options.get("syslog"):
        return None
    name = server_options.get("logfile") or ""
    if name == "-" or (server_options.get("nodaemon") and not name):
        return sys.stdout
    logfile = LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            # Between two reactor iterations, not in the middle of a write.
            cast(IReactorThreads, reactor).callFromThread(logfile.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return logfile


class LogApplication(MultiService):
    """The parent of the real service tree, which makes twistd log through our observer.

    When twistd attaches it to its ``Application`` (which happens before
    twistd starts logging) it sets the application's ``ILogObserver``
    component, which twistd then uses instead of its text observer.
    """

    def __init__(self, service: IService, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def for_twistd(
    service: IService, server_options: object, log_format: str = "json", reactor: Any = None,
    lines_to: Callable[[Callable[[str], None], str], None] | None = None,
) -> IService:
    """``service`` as twistd should get it from ``makeService``: logging JSON lines
    (``log_format`` "json") or twistd's text format ("text"), written once per
    reactor turn (``logbatch.BatchedObserver``) where twistd's observer would
    write and flush each line.

    ``server_options`` is the runner's options (the plugin's
    ``Options.parent``).  Unchanged when twistd logs elsewhere by the
    operator's choice (``--logger``, ``--syslog``), and under ``twist``,
    which has its own ``--log-format`` and ignores the application's observer.
    When our observer is used, ``lines_to(write, log_format)`` is told how to
    add lines already in this format (a master's session workers format their own).
    """
    if not isinstance(server_options, app.ServerOptions):
        return service
    out = twistd_output(server_options)
    if out is None:
        return service
    if reactor is None:
        from twisted.internet import reactor
    observer = BatchedObserver(out, line_format(log_format), reactor)
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
    if lines_to is not None:
        lines_to(observer.write, log_format)
    return LogApplication(service, lognoise.quiet(observer))
