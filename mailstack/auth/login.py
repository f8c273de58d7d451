# -*- test-case-name: tests.auth.test_login -*-
"""The login policy SMTP AUTH and POP3 USER/PASS/AUTH share.

One attempt is: the account key of the username; an attempt reserved with the
throttle (refused at once if the peer or the (peer, account) pair is locked
out: the password is not even checked; held back first if the account is
being guessed from many addresses); a ``twisted.cred`` portal login; a
failure is recorded with the throttle, whose
delay the protocol holds its failure reply back by (and the session's later
commands with it, so a pipelining guesser gains nothing).  A failure is
recorded even if the client has gone meanwhile: hanging up right after the
password must not dodge the lockout.  Every ``ILoginThrottle`` call of the
servers is made here; the throttle answers through Deferreds because with
several worker processes it lives in the master.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from mailstack.address import AddressError, parse_address
from mailstack.auth import cred
from mailstack.interfaces import ILoginThrottle, ILoginTicket, IMetrics
from mailstack.metrics import NoMetrics


def account_key(username: bytes) -> str:
    """The key the throttle counts failures against: ``Address.key`` if it parses, else the lowered text."""
    text = username.decode("utf-8", "replace")
    try:
        return parse_address(text).key
    except AddressError:
        return text.lower()


@dataclass(frozen=True)
class LoginResult:
    """The outcome of one attempt (anything but these errbacks: the checker failed)."""

    account: str
    key: str | None = None  # the user key: logged in
    locked: bool = False  # refused before the password was checked
    delay: float = 0.0  # wrong credentials: hold the failure reply this long


class Authenticator:
    """Reservation, portal login and throttle bookkeeping for one listener factory."""

    def __init__(
        self,
        checker: ICredentialsChecker,
        throttle: ILoginThrottle,
        clock: IReactorTime,
        metrics: IMetrics | None = None,
        protocol: str = "smtp",
    ) -> None:
        self.portal = cred.login_portal(checker)
        self.throttle = throttle
        self.clock = clock
        self.metrics: IMetrics = metrics if metrics is not None else NoMetrics()
        self.protocol = protocol  # the metrics label: smtp or pop3

    def login(self, peer: str, username: bytes, password: bytes | None) -> Deferred[LoginResult]:
        """Try ``username``/``password`` from ``peer``; ``password`` None is a refused
        attempt that still counts (PLAIN with a foreign authorization identity).

        The attempt is reserved with the throttle before the password is
        checked, so simultaneous attempts count against the limits while they
        are in flight; a checker error releases it without counting.
        """
        account = account_key(username)
        d: Deferred[LoginResult] = self.throttle.begin(peer, account).addCallback(
            self._attempt, account, username, password
        )
        return d

    def _attempt(
        self, ticket: ILoginTicket | None, account: str, username: bytes, password: bytes | None
    ) -> LoginResult | Deferred[LoginResult]:
        """The throttle answered: refused, or the (possibly delayed) check with its verdict recorded."""
        if ticket is None:
            self.metrics.auth_failed(self.protocol)
            return LoginResult(account, locked=True)
        if ticket.delay > 0:
            d: Deferred = deferLater(self.clock, ticket.delay, self._check, username, password)
        else:
            d = self._check(username, password)

        def ok(key: object) -> LoginResult:
            user = key.decode("utf-8") if isinstance(key, bytes) else str(key)
            ticket.succeeded()
            return LoginResult(account, key=user)

        def refused(f: Failure) -> Deferred[LoginResult] | Failure:
            if not f.check(LoginFailed):
                ticket.abandoned()
                return f
            self.metrics.auth_failed(self.protocol)
            return ticket.failed().addCallback(lambda delay: LoginResult(account, delay=float(delay or 0.0)))

        return d.addCallbacks(ok, refused)

    def _check(self, username: bytes, password: bytes | None) -> Deferred:
        if password is None:
            return fail(UnauthorizedLogin("authorization identity differs"))
        return cred.login(self.portal, username, password)
