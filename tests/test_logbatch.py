"""Tests for mailstack.logbatch: log lines written once per reactor turn."""

from __future__ import annotations

from unittest.mock import patch

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


class RunningClock(Clock):
    running = True


class BatchedObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = RecordingOut()
        self.clock = RunningClock()
        self.pipe = BatchedObserver(self.out, lambda e: eventAsJSON(e) + "\n", self.clock)  # type: ignore[arg-type]
        verifyObject(ILogObserver, self.pipe)
        self.log = Logger(observer=self.pipe, namespace="mailstack.test")

    def test_oneWritePerReactorTurn(self) -> None:
        """Events of one reactor turn go out in one write, as JSON lines the master can read back."""
        with patch("mailstack.logbatch.isInIOThread", return_value=True):
            self.log.info("a {n}", n=1)
            self.log.info("b {n}", n=2)
        self.assertEqual(self.out.writes, [])
        self.clock.advance(0)
        self.assertEqual(len(self.out.writes), 1)
        events = [eventFromJSON(line) for line in self.out.writes[0].splitlines()]
        self.assertEqual([e["n"] for e in events], [1, 2])

    def test_otherThreadsAndStoppedReactorWriteAtOnce(self) -> None:
        """Outside the reactor thread, or with the reactor not running, a line is written at once."""
        self.clock.running = False
        self.log.info("now")
        self.assertEqual(len(self.out.writes), 1)
        self.clock.running = True
        with patch("mailstack.logbatch.isInIOThread", return_value=False):
            self.log.info("from a pool thread")
        self.assertEqual(len(self.out.writes), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])


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
