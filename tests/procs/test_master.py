"""Tests for mailstack.procs.master: the worker pool and the log relay."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import Logger, eventAsJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailstack.config import from_mapping
from mailstack.connlimit import connection_limiters
from mailstack.procs import master
from mailstack.procs.stateserver import StateServer
from tests.procs.test_slots import RecordingKicker
from tests.support.fakes import FakeThrottle


class FakeProcess:
    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor(Clock):
    """Records spawned processes and adopted connections (the pool's only reactor calls besides time)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict, dict]] = []
        self.adopted: list[Any] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict, childFDs: dict) -> FakeProcess:
        self.spawned.append((protocol, args, env, childFDs))
        return FakeProcess()

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        self.adopted.append(factory.buildProtocol(None))


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        config = from_mapping({}, base=self.mktemp())
        state = StateServer(FakeThrottle(), None, limiters=connection_limiters(config))  # type: ignore[arg-type]
        self.pool = master.WorkerPool(self.reactor, "/etc/m.toml", 2, RecordingKicker(), 5.0, state)
        self.pool.privilegedStartService()
        self.pool.startService()

    def test_workersStarted(self) -> None:
        """Each worker is the worker module with its index, the config, its AMP fd and no systemd socket."""
        self.assertEqual(len(self.reactor.spawned), 2)
        _, args, env, fds = self.reactor.spawned[1]
        self.assertEqual(args[1:3], ["-m", "mailstack.procs.worker"])
        self.assertEqual(args[args.index("--index") + 1], "1")
        self.assertEqual(args[args.index("--config") + 1], "/etc/m.toml")
        self.assertEqual(json.loads(args[args.index("--listeners") + 1]), [])
        self.assertIn(master.CHANNEL_FD, fds)
        self.assertNotIn("NOTIFY_SOCKET", env)
        self.assertEqual(len(self.reactor.adopted), 2)

    def test_workersFormatTheirLinesForOurLog(self) -> None:
        """Once the master's log takes whole lines, workers started after are told its format
        and their output goes to it as it is."""
        written: list[str] = []
        self.pool.write_lines_to(written.append, "text")
        self.reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.reactor.advance(master.RESTART_DELAY)
        protocol, args, _, _ = self.reactor.spawned[-1]
        self.assertEqual(args[args.index("--log-lines") + 1], "text")
        protocol.childDataReceived(1, b"a line\n")
        self.assertEqual(written, ["a line\n"])
        self.flushLoggedErrors()

    def test_readyOnceAllListen(self) -> None:
        """``ready`` fires when every worker has said Ready."""
        self.pool.channels[0].worker_ready()
        self.assertNoResult(self.pool.ready)
        self.pool.channels[1].worker_ready()
        self.successResultOf(self.pool.ready)

    def test_crashedWorkerRestarted(self) -> None:
        """A worker that exits while the server runs is started again after RESTART_DELAY."""
        protocol = self.reactor.spawned[0][0]
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertNotIn(0, self.pool.processes)
        self.reactor.advance(master.RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertIn(0, self.pool.processes)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_stopSignalsAndWaits(self) -> None:
        """Stop sends SIGTERM to each worker and fires once all have exited; none is restarted."""
        processes = list(self.pool.processes.values())
        d = self.pool.stopService()
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM"]])
        self.reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(d)
        self.reactor.spawned[1][0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_killedAfterGrace(self) -> None:
        """A worker still running after its grace and the margin gets SIGKILL."""
        process = self.pool.processes[0]
        self.pool.stopService()
        self.reactor.advance(5.0 + master.EXIT_MARGIN)
        self.assertEqual(process.signals, ["TERM", "KILL"])


class LogRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.protocol = master.WorkerProcess(None, 4)  # type: ignore[arg-type]

    def test_jsonLinesReEmitted(self) -> None:
        """A worker's JSON log line, even split over reads, becomes one event of ours tagged worker<N>."""
        captured: list[dict] = []
        Logger(observer=captured.append, namespace="mailstack.smtp").info("accepted {queue_id}", queue_id="q1")
        line = (eventAsJSON(captured[0]) + "\n").encode()
        self.protocol.childDataReceived(1, line[:10])
        self.assertEqual(self.events, [])
        self.protocol.childDataReceived(1, line[10:])
        relayed = [e for e in self.events if e.get("queue_id") == "q1"]
        self.assertEqual(len(relayed), 1)
        self.assertEqual((relayed[0]["log_system"], relayed[0]["log_namespace"]), ("worker4", "mailstack.smtp"))

    def test_otherOutputLoggedEscaped(self) -> None:
        """Anything else (stderr, a traceback) is logged as an error, control characters escaped."""
        self.protocol.childDataReceived(2, b"Traceback \x1b[31m\n")
        errors = [e for e in self.events if e.get("log_level") is not None and e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertNotIn("\x1b", errors[0]["line"])


class EndedPool:
    """The one pool call a WorkerProcess makes: which workers ended."""

    def __init__(self) -> None:
        self.indexes: list[int] = []

    def ended(self, index: int, reason: Failure) -> None:
        self.indexes.append(index)


class LinePassingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.written: list[str] = []
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.pool = EndedPool()
        self.protocol = master.WorkerProcess(self.pool, 2, self.written.append)  # type: ignore[arg-type]

    def test_wholeLinesPassedAsTheyAre(self) -> None:
        """A worker's formatted lines reach the master's log unparsed, a batch at a time, and a
        line split over reads only once it is whole (no other process's line lands inside it)."""
        self.protocol.childDataReceived(1, b"2026 [worker2] one\n2026 [worker2] tw")
        self.assertEqual(self.written, ["2026 [worker2] one\n"])
        self.protocol.childDataReceived(1, b"o \xc3\xa9\n")
        self.assertEqual(self.written, ["2026 [worker2] one\n", "2026 [worker2] two \u00e9\n"])
        self.assertEqual([e for e in self.events if e.get("log_system") == "worker2"], [])

    def test_lastLineKeptWhenTheWorkerEnds(self) -> None:
        """A last line without its newline (the worker was killed mid-write) is kept at exit."""
        self.protocol.childDataReceived(1, b"cut sho")
        self.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual((self.written, self.pool.indexes), (["cut sho\n"], [2]))

    def test_stderrStillAnError(self) -> None:
        """What a worker prints on stderr is still logged as an escaped error, not passed."""
        self.protocol.childDataReceived(2, b"Traceback \x1b[31m\n")
        self.assertEqual(self.written, [])
        errors = [e for e in self.events if e.get("line") is not None]
        self.assertEqual(len(errors), 1)
        self.assertNotIn("\x1b", errors[0]["line"])
