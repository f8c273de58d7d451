"""Tests for mailstack.logbatch: log lines written once per reactor turn."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, eventAsJSON, eventFromJSON, formatEventAsClassicLogText, formatTime
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.logbatch import BatchedObserver, classic_text


class RecordingOut:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, data: str) -> None:
        self.writes.append(data)

    def flush(self) -> None:
        pass


class RunningReactor(Clock):
    """A clock whose callFromThread runs at the end of the turn, as the reactor's does."""

    running = True

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.callLater(0, f, *args)


class BatchedObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = RecordingOut()
        self.reactor = RunningReactor()
        self.pipe = BatchedObserver(self.out, lambda e: eventAsJSON(e) + "\n", self.reactor)  # type: ignore[arg-type]
        verifyObject(ILogObserver, self.pipe)
        self.log = Logger(observer=self.pipe, namespace="mailstack.test")

    def test_oneWritePerReactorTurn(self) -> None:
        """Events of one reactor turn go out in one write, as JSON lines the master can read back."""
        self.log.info("a {n}", n=1)
        self.log.info("b {n}", n=2)
        self.assertEqual(self.out.writes, [])
        self.reactor.advance(0)
        self.assertEqual(len(self.out.writes), 1)
        events = [eventFromJSON(line) for line in self.out.writes[0].splitlines()]
        self.assertEqual([e["n"] for e in events], [1, 2])

    def test_linesFormattedElsewhereJoinTheBatch(self) -> None:
        """``write`` adds lines formatted elsewhere (a worker's) to the turn's batch, in order."""
        self.log.info("a {n}", n=1)
        self.pipe.write("worker line\n")
        self.assertEqual(self.out.writes, [])
        self.reactor.advance(0)
        self.assertEqual(self.out.writes[0].splitlines()[1], "worker line")

    def test_reactorNotRunningWritesAtOnce(self) -> None:
        """Before the reactor runs or after it stopped, a line is written at once."""
        self.reactor.running = False
        self.log.info("now")
        self.assertEqual(len(self.out.writes), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_signalHandlerLoggingMeanwhile(self) -> None:
        """A line logged while the observer is busy in this thread (a signal handler runs
        between two bytecodes) neither deadlocks nor is lost: it is written in the same flush."""
        real_write = self.out.write

        def write(data: str) -> None:
            real_write(data)
            if len(self.out.writes) == 1:
                self.log.info("SIGTERM: stopping")  # re-entered while flush holds the lock

        self.out.write = write  # type: ignore[method-assign]
        self.log.info("first")
        self.reactor.advance(0)
        self.assertEqual(len(self.out.writes), 2)
        self.assertIn("SIGTERM", self.out.writes[1])
        self.reactor.advance(0)
        self.assertEqual(len(self.out.writes), 2)

    def test_signalHandlerWhileFormatting(self) -> None:
        """Re-entered while an event is being taken in: both lines are kept, in order."""
        calls: list[int] = []

        def line(event: Any) -> str:
            calls.append(1)
            if len(calls) == 1:
                self.pipe({"log_format": "inner", "log_namespace": "x"})
            return str(event.get("log_format")) + "\n"

        self.pipe.format_event = line
        self.pipe({"log_format": "outer", "log_namespace": "x"})
        self.reactor.advance(0)
        self.assertEqual("".join(self.out.writes), "inner\nouter\n")


class ClassicTextTests(SynchronousTestCase):
    def test_sameAsTwistdText(self) -> None:
        """classic_text writes exactly what twistd's text observer writes, across second boundaries."""
        fmt = classic_text()
        events: list[dict] = []
        log = Logger(observer=events.append, namespace="mailstack.test")
        for _ in range(3):
            log.info("x {y}", y="z")
        for when in (1000.2, 1000.9, 1001.0, 999.5):
            for event in events:
                event["log_time"] = when
                want = formatEventAsClassicLogText(event, formatTime=lambda e: formatTime(e))
                self.assertEqual(fmt(event), want)
