# -*- test-case-name: tests.pop3.test_server -*-
"""The listener factory of the pop3 (STLS offered) and pop3s (implicit TLS) listeners.

``pop3.max_connections`` and ``pop3.max_connections_per_ip`` count both
listeners together: they are the runtime's ``pop3_connections`` limiter.  For pop3s, ``service.py`` wraps the factory in
``TLSMemoryBIOFactory``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from zope.interface import implementer

from mailstack.auth.login import Authenticator
from mailstack.interfaces import IDrainable, IRuntime
from mailstack.pop3.server import POP3Server
from mailstack.session import SessionGroup

KINDS = ("pop3", "pop3s")


@implementer(IDrainable)
class POP3Factory(ServerFactory):
    """Builds ``POP3Server`` sessions for one listener."""

    noisy = False

    def __init__(self, kind: str, runtime: IRuntime) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown POP3 listener kind {kind!r}")
        self.kind = kind
        self.runtime = runtime
        self.authenticator = Authenticator(runtime.checker, runtime.throttle, runtime.reactor, runtime.metrics, "pop3")
        self.group = SessionGroup(runtime.reactor)

    def buildProtocol(self, addr: Any) -> POP3Server:
        return POP3Server(self, implicit_tls=self.kind == "pop3s")

    def drain(self, timeout: float) -> Deferred[None]:
        """Called by service.py on SIGTERM after the listeners closed.

        Idle sessions get ``-ERR [SYS/TEMP]`` and are closed at once; a command in
        progress (a RETR being sent, the deletions of QUIT) may finish for up to
        ``timeout`` seconds, then the rest are aborted.  Nothing enters UPDATE
        that the client did not QUIT, so no DELE is carried out by a shutdown.
        """
        return self.group.drain(timeout)


def make_factory(kind: str, runtime: IRuntime) -> POP3Factory:
    """The factory for a ``pop3`` (STLS offered) or ``pop3s`` (implicit TLS) listener."""
    return POP3Factory(kind, runtime)
