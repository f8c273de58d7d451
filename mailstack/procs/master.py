# -*- test-case-name: tests.procs.test_master -*-
"""The master process of ``[server] processes`` > 1: listening sockets and session workers.

The split follows Postfix's (smtpd -> cleanup -> qmgr -> smtp) with fewer
parts.  The master binds every listener of ``[listen]`` (before twistd drops
privileges) and runs the queue manager, outbound delivery, DSNs, the DKIM key
set-up and the state that limits clients across sessions; it accepts no
connection itself.  Each worker (``procs.worker``, one per core by default)
inherits the listening sockets, adopts them (``IReactorSocket.adoptStreamPort``:
the kernel hands each new connection to one of the workers waiting) and runs
the SMTP and POP3 sessions and the intake.  The queue directory and its commit
protocol are the interface between the two sides, as in one process: a
worker commits a message, then kicks the master over AMP (``commands.Kick``);
a kick lost with a crash costs nothing but time, since the next start scans
the queue.

Each worker talks AMP with the master over a UNIX socket pair (fd 3 in the
worker) and writes its log to its stdout, so operators read one log: when
the master writes its own log (``jsonlog.for_twistd``), the worker formats
each line as the master would (``[log] format``, system ``worker<N>``) and
the master adds whole lines to its log as they come, without parsing them;
otherwise (``--logger``, ``--syslog``) the worker writes its events as JSON
and the master re-emits them into its log with ``log_system`` ``worker<N>``.
A worker that exits unexpectedly is started again after ``RESTART_DELAY``
seconds; its connection slots are given back.  On SIGTERM the master stops
listening, sends SIGTERM to every worker (each drains its sessions as a
single process does, bounded by ``smtp.shutdown_grace``), waits for them,
and only then stops the queue manager.  Workers ask the kernel for SIGTERM when the master dies
(``PR_SET_PDEATHSIG``), so a master killed with SIGKILL leaves no worker
accepting mail for long.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, ServerFactory, connectionDone
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from mailstack.interfaces import IQueueKicker
from mailstack.logsafe import escape
from mailstack.procs.channel import Channel
from mailstack.procs.commands import Exposition, Kick, Ready
from mailstack.procs.stateserver import StateServer, WorkerState

RESTART_DELAY = 1.0
# After SIGTERM a worker has smtp.shutdown_grace to drain, plus this for its commits and exit.
EXIT_MARGIN = 15.0
CHANNEL_FD = 3  # the worker's end of its AMP socket pair
FIRST_LISTENER_FD = 4


def worker_count(processes: int) -> int:
    """``server.processes`` (0: "auto") -> the number of session workers."""
    return processes or max(1, len(os.sched_getaffinity(0)))


class MasterChannel(Channel):
    """The master's end of one worker's AMP connection."""

    def __init__(self, index: int, kicker: IQueueKicker, ready: Callable[[int], None], state: WorkerState) -> None:
        super().__init__()
        self.index = index
        self.kicker = kicker
        self._ready = ready
        self._state = state
        state.channel = self  # the master asks the worker back for its spare slots

    def locateResponder(self, name: bytes) -> Any:
        """Our commands, then those of the shared state (``procs.stateserver``)."""
        return super().locateResponder(name) or self._state.locateResponder(name)

    @Kick.responder
    def kick(self, queue_ids: list[str]) -> dict[str, str]:
        for queue_id in queue_ids:
            self.kicker.kick(queue_id)
        return {}

    @Ready.responder
    def worker_ready(self) -> dict[str, str]:
        self._ready(self.index)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._state.lost()
        super().connectionLost(reason)


class OneProtocol(Factory):
    """Builds the one protocol instance it was given (for ``adoptStreamConnection``)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


class WorkerProcess(ProcessProtocol):
    """One worker's process: its log lines passed on (or its events re-emitted), its exit reported."""

    log = Logger()

    def __init__(self, pool: WorkerPool, index: int, write_lines: Callable[[str], None] | None = None) -> None:
        self.pool = pool
        self.index = index
        self.write_lines = write_lines  # the master's log, when the worker formats its lines
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1 and self.write_lines is not None:
            # Whole lines only, so that no other process's line lands inside one.
            data = self._partial[1] + data
            end = data.rfind(b"\n") + 1
            self._partial[1] = data[end:]
            if end:
                self.write_lines(data[:end].decode("utf-8", "replace"))
            return
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            if line:
                self._line(childFD, line)

    def _line(self, fd: int, line: bytes) -> None:
        if fd == 1:
            try:
                event = eventFromJSON(line.decode("utf-8"))
            except ValueError:
                event = None
            if isinstance(event, dict):
                event["log_system"] = f"worker{self.index}"
                globalLogPublisher(event)
                return
        self.log.error("worker {index}: {line}", index=self.index, line=escape(line.decode("utf-8", "replace")))

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():  # a last line without its newline (a killed worker)
            if rest:
                self.childDataReceived(fd, b"\n")
        self.pool.ended(self.index, reason)


class Listener:
    """One bound listening socket the workers adopt."""

    def __init__(self, kind: str, description: str, port: IListeningPort, tls: bool) -> None:
        self.kind = kind
        self.description = description
        self.port = port
        self.tls = tls
        host = port.getHost()
        self.family = {IPv4Address: socket.AF_INET, IPv6Address: socket.AF_INET6}.get(type(host), socket.AF_UNIX)

    def fileno(self) -> int:
        return int(self.port.fileno())  # type: ignore[attr-defined]


def bind(reactor: Any, kind: str, description: str, endpoint_string: str, tls: bool) -> Listener:
    """Listen on ``endpoint_string`` without accepting (the workers accept); raises CannotListenError."""
    result: list[Any] = []
    factory = ServerFactory()
    factory.noisy = False
    serverFromString(reactor, endpoint_string).listen(factory).addBoth(result.append)
    if not result:  # every stream endpoint we support binds at once
        raise RuntimeError(f"{description}: the endpoint did not bind synchronously")
    if isinstance(result[0], Failure):
        result[0].raiseException()
    port = result[0]
    port.stopReading()  # the socket stays open and listening; the workers accept on it
    return Listener(kind, description, port, tls)


class WorkerPool(Service):
    """Starts ``count`` workers on ``listeners``, restarts them, stops them first at SIGTERM."""

    name = "workers"
    log = Logger()

    def __init__(self, reactor: Any, config_path: str, count: int, kicker: IQueueKicker, grace: float,
                 state: StateServer, account: tuple[int, int] | None = None) -> None:
        self.reactor = reactor
        self.account = account  # (uid, gid) of twistd --uid/--gid
        self.grace = grace  # smtp.shutdown_grace: how long a worker may drain
        self.config_path = config_path
        self.count = count
        self.kicker = kicker
        self.state = state
        self._to_bind: list[tuple[str, str, str, bool]] = []
        self.listeners: list[Listener] = []
        self.processes: dict[int, Any] = {}  # index -> IProcessTransport
        self.channels: dict[int, MasterChannel] = {}
        self.ready: Deferred[None] = Deferred()  # every worker reported Ready once
        self._waiting_ready: set[int] = set()
        self._stopping = False
        self._exits: dict[int, Deferred[None]] = {}
        self._write_lines: Callable[[str], None] | None = None
        self._log_format = ""

    def write_lines_to(self, write: Callable[[str], None], log_format: str) -> None:
        """Workers started from now on format their log lines in ``log_format`` ("text",
        "json"), and ``write`` adds them to the master's log as they are."""
        self._write_lines, self._log_format = write, log_format

    def add_listener(self, kind: str, description: str, endpoint_string: str, tls: bool) -> None:
        """Bind ``endpoint_string`` at the privileged start, for the workers to accept on."""
        self._to_bind.append((kind, description, endpoint_string, tls))

    def privilegedStartService(self) -> None:
        """Bind, and start the workers while we may still run the interpreter as root
        (``twistd --uid``): each worker switches to the account itself once it is set up."""
        super().privilegedStartService()
        for kind, description, endpoint_string, tls in self._to_bind:  # CannotListenError stops the start
            self.listeners.append(bind(self.reactor, kind, description, endpoint_string, tls))
        self._waiting_ready = set(range(self.count))
        for index in range(self.count):
            self._spawn(index)

    def _argv(self, index: int) -> list[str]:
        listeners = [
            {"kind": x.kind, "fd": FIRST_LISTENER_FD + i, "family": int(x.family), "tls": x.tls}
            for i, x in enumerate(self.listeners)
        ]
        argv = [sys.executable, "-m", "mailstack.procs.worker", "--index", str(index), "--parent", str(os.getpid()),
                "--config", self.config_path, "--listeners", json.dumps(listeners)]
        if self.account is not None and os.getuid() == 0:
            argv += ["--account", f"{self.account[0]}:{self.account[1]}"]
        if self._write_lines is not None:
            argv += ["--log-lines", self._log_format]
        return argv

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the master talks to systemd
        return env

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            child_fds: dict[int, Any] = {1: "r", 2: "r", CHANNEL_FD: theirs.fileno()}
            for i, listener in enumerate(self.listeners):
                child_fds[FIRST_LISTENER_FD + i] = listener.fileno()
            protocol = WorkerProcess(self, index, self._write_lines)
            self.processes[index] = self.reactor.spawnProcess(
                protocol, sys.executable, self._argv(index), env=self._env(), childFDs=child_fds
            )
            channel = MasterChannel(index, self.kicker, self._worker_ready, self.state.worker())
            self.channels[index] = channel
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, OneProtocol(channel))
        finally:
            ours.close()  # adoptStreamConnection and the child hold their own copies
            theirs.close()

    def expositions(self) -> Deferred[list[bytes]]:
        """Every running worker's metrics (``metrics.Metrics.add_source``); a worker that
        cannot answer (starting, stopping) is left out of this scrape."""
        asked = [c.callRemote(Exposition) for c in self.channels.values()]
        return gatherResults([d.addCallbacks(lambda r: r["text"], lambda f: b"") for d in asked])

    def _worker_ready(self, index: int) -> None:
        self._waiting_ready.discard(index)
        if not self._waiting_ready and not self.ready.called:
            self.ready.callback(None)

    def ended(self, index: int, reason: Failure) -> None:
        self.processes.pop(index, None)
        self.channels.pop(index, None)
        exited = self._exits.pop(index, None)
        if exited is not None:
            exited.callback(None)
        if self._stopping:
            return
        clean = reason.check(ProcessDone) is not None
        self.log.error("worker {index} exited ({reason}); starting it again in {delay}s",
                       index=index, reason=reason.getErrorMessage() if not clean else "status 0", delay=RESTART_DELAY)
        self.reactor.callLater(RESTART_DELAY, self._restart, index)

    def _restart(self, index: int) -> None:
        if self._stopping or index in self.processes:
            return
        try:
            self._spawn(index)
        except OSError:  # e.g. the account may not run this interpreter: try again later
            self.log.failure("cannot start worker {index}", index=index)
            self.reactor.callLater(RESTART_DELAY * 10, self._restart, index)

    def stop_listening(self) -> None:
        """Close the master's copies of the listening sockets (the workers close theirs as they stop)."""
        for listener in self.listeners:
            listener.port.stopListening()

    def stopService(self) -> Deferred[Any]:
        """SIGTERM every worker; fires when all have exited (SIGKILL after their grace)."""
        super().stopService()
        self._stopping = True
        self.stop_listening()
        waits = []
        for index, process in list(self.processes.items()):
            exited: Deferred[None] = Deferred()
            self._exits[index] = exited
            waits.append(exited)
            process.signalProcess("TERM")
        grace = self.grace + EXIT_MARGIN
        killer = self.reactor.callLater(grace, self._kill_remaining)
        done = DeferredList(waits)

        def finished(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        return done.addBoth(finished)

    def _kill_remaining(self) -> None:
        for index, process in list(self.processes.items()):
            self.log.error("worker {index} still running {grace}s after SIGTERM: killing it",
                           index=index, grace=self.grace + EXIT_MARGIN)
            process.signalProcess("KILL")
