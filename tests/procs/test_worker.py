"""Tests for mailstack.procs.worker (the parts that run without a real process)."""

from __future__ import annotations

import os
import signal
from unittest.mock import patch

from twisted.internet.error import ReactorNotRunning
from twisted.logger import LogLevel, eventFromJSON, formatEventAsClassicLogText, formatTime
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from mailstack.jsonlog import event_as_json
from mailstack.metrics import Metrics
from mailstack.procs import worker
from mailstack.procs.commands import Exposition


class StoppableReactor:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1
        if self.stops > 1:
            raise ReactorNotRunning()


class WorkerTests(SynchronousTestCase):
    def test_arguments(self) -> None:
        """The master's argument list parses: index, parent, config, listeners as JSON."""
        args = worker.parse(["--index", "1", "--parent", "7", "--config", "/m.toml",
                             "--listeners", '[{"kind": "smtp", "fd": 4, "family": 2, "tls": false}]'])
        self.assertEqual((args.index, args.parent, args.config, args.account), (1, 7, "/m.toml", ""))
        self.assertEqual(args.listeners[0]["kind"], "smtp")

    def test_logLinesInTheMastersFormat(self) -> None:
        """With --log-lines the worker writes the master's final line, tagged with its system;
        without, the event as JSON for the master to re-emit."""
        args = worker.parse(["--index", "3", "--parent", "7", "--listeners", "[]", "--log-lines", "text"])
        event = {"log_format": "accepted {queue_id}", "queue_id": "q1", "log_time": 0.0,
                 "log_level": LogLevel.info, "log_namespace": "mailstack.intake"}
        self.assertEqual(worker.log_lines(args.log_lines, args.index)(event),
                         formatEventAsClassicLogText({**event, "log_system": "worker3"}, formatTime=formatTime))
        self.assertIn("[worker3] accepted q1\n", worker.log_lines("text", 3)(event) or "")
        self.assertEqual(worker.log_lines("json", 3)(event), event_as_json(event) + "\n")
        self.assertEqual(eventFromJSON(worker.log_lines(None, 3)(event) or "")["queue_id"], "q1")
        self.assertNotIn("log_system", event)

    def test_orphanExitsAtOnce(self) -> None:
        """The worker asks the kernel for SIGTERM when its parent dies; one whose master is
        already gone (another parent) exits before starting anything."""
        calls: list[tuple[int, int]] = []

        class LibC:
            def prctl(self, option: int, value: int) -> int:
                calls.append((option, value))
                return 0

        # A stand-in C library, so the test runner itself is not given a death signal.
        with patch("mailstack.procs.worker.ctypes.CDLL", return_value=LibC()):
            self.assertRaises(SystemExit, worker.die_with_parent, os.getpid())  # our parent is not ourselves
            worker.die_with_parent(os.getppid())  # the right parent: returns
        self.assertEqual(calls, [(1, signal.SIGTERM)] * 2)  # PR_SET_PDEATHSIG

    def test_metricsAnswered(self) -> None:
        """The master's Exposition is answered with the worker's metrics."""
        reactor = StoppableReactor()
        channel = worker.WorkerChannel(reactor)
        channel.metrics = Metrics()
        channel.metrics.accepted("smtp")
        master, _, pump = connectedServerAndClient(lambda: channel, amp.AMP)
        d = master.callRemote(Exposition)
        pump.flush()
        self.assertIn(b'mailstack_messages_accepted_total{listener="smtp"} 1.0', self.successResultOf(d)["text"])

    def test_lostMasterStops(self) -> None:
        """Losing the master's connection stops the reactor (a graceful stop), also during a stop."""
        reactor = StoppableReactor()
        channel = worker.WorkerChannel(reactor)
        master, _, pump = connectedServerAndClient(lambda: channel, amp.AMP)
        reactor.stop()  # SIGTERM came first
        master.transport.loseConnection()
        pump.flush()
        self.assertEqual(reactor.stops, 2)

