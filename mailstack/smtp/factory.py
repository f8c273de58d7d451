# -*- test-case-name: tests.smtp.test_smtp_server -*-
"""The listener factory of the smtp, submission and submissions listeners, and their drain.

Connection caps: the MX listener uses the runtime's ``smtp_connections``
limiter, submission and submissions share ``submission_connections`` (see
``connlimit``); the per-user sending limits are the runtime's ``send_limits``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from zope.interface import implementer

from mailstack.auth.login import Authenticator
from mailstack.interfaces import IConnectionSlots, IDrainable, IRuntime
from mailstack.session import SessionGroup
from mailstack.smtp import replies as R
from mailstack.smtp.policy import ListenerPolicy
from mailstack.smtp.server import SMTPServer


@implementer(IDrainable)
class SMTPFactory(ServerFactory):
    """Builds ``SMTPServer`` sessions for one listener kind."""

    noisy = False

    def __init__(self, kind: str, runtime: IRuntime) -> None:
        self.kind = kind
        self.policy = ListenerPolicy.for_kind(kind)
        self.runtime = runtime
        self.authenticator = Authenticator(runtime.checker, runtime.throttle, runtime.reactor, runtime.metrics, "smtp")
        self.pipeline = runtime.pipeline
        self.banner = R.banner(runtime.config.hostname).encode()
        # The EHLO keywords every session offers (RFC 2920, 1870, 6152, 2034).
        self.extensions = (
            "PIPELINING",
            f"SIZE {runtime.config.smtp.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
            "SMTPUTF8",
        )
        self.group = SessionGroup(runtime.reactor)
        self.limiter: IConnectionSlots = runtime.smtp_connections if kind == "smtp" else runtime.submission_connections

    def buildProtocol(self, addr: Any) -> SMTPServer:  # type: ignore[override]  # Twisted's bound TypeVar
        return SMTPServer(self)

    def drain(self, timeout: float) -> Deferred[None]:
        """Graceful shutdown (SIGTERM): stop taking new sessions, finish what is in flight.

        New connections get 421 4.3.2.  Idle sessions get 421 4.3.2 at once;
        a session in a transaction (MAIL given, or DATA being received or
        committed) gets it after its final reply.  The Deferred fires (with
        None) when every session is gone, or after ``timeout`` seconds, when
        the remaining ones are dropped (messages not yet acknowledged are
        aborted; nothing acknowledged is lost).  Stop the listening port first.
        """
        return self._intake_idle(self.group.drain(timeout), timeout)

    def _intake_idle(self, sessions_gone: Deferred, timeout: float) -> Deferred[None]:
        """After the sessions: wait (at most ``timeout``) for the intake's commits in flight.

        A commit whose client already left then still finishes before the
        queue manager and the thread pool stop.
        """
        out: Deferred[None] = Deferred()
        clock = self.runtime.reactor

        def fire(_: Any = None) -> None:
            if not out.called:
                out.callback(None)

        def then(_: Any) -> None:
            call = clock.callLater(timeout, fire)

            def idle(_: Any) -> None:
                if call.active():
                    call.cancel()
                fire()

            self.runtime.intake.wait_idle().addBoth(idle)

        sessions_gone.addBoth(then)
        return out


def make_factory(kind: str, runtime: IRuntime) -> SMTPFactory:
    """The ServerFactory of one SMTP listener: ``"smtp"``, ``"submission"`` or ``"submissions"``."""
    return SMTPFactory(kind, runtime)
