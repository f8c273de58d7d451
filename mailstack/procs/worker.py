# -*- test-case-name: tests.procs.test_worker -*-
"""A session worker: ``python -m mailstack.procs.worker``, started by the master (``procs.master``).

It runs the SMTP and POP3 sessions and the intake on the listening sockets it
inherited (fds from ``master.FIRST_LISTENER_FD``), asks the master over AMP
(fd ``master.CHANNEL_FD``) for connection slots and the shared limits, kicks
its queue manager, and writes its log to stdout (``logbatch``: one write per
reactor turn): lines in the master's format with ``--log-lines``, which the
master adds to its log as they are, else events as JSON that it re-emits.  SIGTERM (from the master, or
from the kernel when the master dies) is the graceful stop of a single
process: stop listening, drain, finish the commits, exit 0.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import connectionDone
from twisted.logger import LogEvent, Logger, eventAsJSON, globalLogBeginner
from twisted.python.failure import Failure

from mailstack import lognoise
from mailstack.interfaces import IMetrics
from mailstack.jsonlog import line_format
from mailstack.logbatch import BatchedObserver
from mailstack.metrics import NoMetrics
from mailstack.procs.channel import Channel
from mailstack.procs.commands import Exposition
from mailstack.procs.master import CHANNEL_FD, OneProtocol
from mailstack.procs.slots import SlotLeases

log = Logger()

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGTERM when the master dies (Linux ``prctl``); exit now if it is already gone."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the lost AMP connection stops us instead
        pass
    if os.getppid() != parent:
        raise SystemExit(0)


class WorkerChannel(Channel):
    """The worker's end of the AMP connection; losing it (the master died) stops the worker."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.metrics: IMetrics = NoMetrics()  # the runtime's, once built
        self.leases = SlotLeases(self, reactor)  # the connection slots the master lends us

    def locateResponder(self, name: bytes) -> Any:
        """Our commands, then the master's ``ReturnSpares``."""
        return super().locateResponder(name) or self.leases.locateResponder(name)

    @Exposition.responder
    def exposition(self) -> dict[str, bytes]:
        return {"text": self.metrics.exposition()}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        log.info("the master process is gone: stopping")
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # already stopping (SIGTERM came first)
            pass


def log_lines(log_format: str | None, index: int) -> Callable[[LogEvent], str | None]:
    """How the worker writes an event: the master's line in ``log_format`` ("text",
    "json") with the system ``worker<index>``, or (None) the event as JSON."""
    if log_format is None:
        return lambda event: eventAsJSON(event) + "\n"
    system = f"worker{index}"
    line = line_format(log_format)

    def tagged(event: LogEvent) -> str | None:
        return line({**event, "log_system": system})

    return tagged


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mailstack-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--config", default="")
    parser.add_argument("--listeners", type=json.loads, required=True)
    parser.add_argument("--account", default="", help="uid:gid to switch to once set up (twistd --uid)")
    parser.add_argument("--log-lines", choices=["text", "json"], default=None,
                        help="write log lines in this [log] format (else events as JSON for the master)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    die_with_parent(args.parent)
    # Imported after the check above: a worker of a dead master starts nothing.
    from twisted.internet import reactor as _reactor
    from twisted.python.util import switchUID

    from mailstack import config as configmod
    from mailstack import privileges
    from mailstack.procs.commands import Ready
    from mailstack.service import StartupError, load_parts, make_worker_service
    from mailstack.tap import freeze_startup_heap, install_sigterm, return_big_frees_to_the_os

    reactor: Any = _reactor
    logs = BatchedObserver(sys.stdout, log_lines(args.log_lines, args.index), reactor)
    globalLogBeginner.beginLoggingTo([lognoise.quiet(logs)], redirectStandardIO=False)
    reactor.addSystemEventTrigger("after", "shutdown", logs.flush)
    return_big_frees_to_the_os()
    account = tuple(int(x) for x in args.account.split(":")) if args.account else None
    try:
        config = configmod.load(args.config or None)
        with privileges.as_account(account):  # type: ignore[arg-type]
            tls, users, aliases = load_parts(config)
    except (configmod.ConfigError, StartupError) as e:
        raise SystemExit(f"mailstack worker: {e}") from None
    channel = WorkerChannel(reactor)
    reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX, OneProtocol(channel))
    os.close(CHANNEL_FD)
    service = make_worker_service(config, reactor, tls, users, aliases, channel, args.listeners)
    channel.metrics = service.runtime.metrics
    if account is not None:  # as twistd does for the master, after setting up as root
        switchUID(account[0], account[1])
    install_sigterm(reactor)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    def start() -> None:
        service.startService()
        freeze_startup_heap()
        channel.callRemote(Ready).addErrback(lambda f: None)  # a master gone stops us anyway

    reactor.callWhenRunning(start)
    reactor.run()


if __name__ == "__main__":
    main()
