# -*- test-case-name: tests.auth.test_cred -*-
"""The ``twisted.cred`` checker that SMTP AUTH (RFC 4954) and POP3 (RFC 1939, 5034) share.

The protocol builds ``UsernamePassword(username, password)`` from the client's
AUTH PLAIN/LOGIN or USER/PASS and asks this checker.  The username is an email
address, parsed and normalised with ``address.parse_address``; the avatar id is
the user key (``Address.key``, a str).  The Argon2 verification takes tens of
milliseconds, so it runs through ``run_blocking`` (the thread pool), never on the
reactor thread.  Brute-force slowdown is the protocol's job (``ILoginThrottle``),
because only it knows the peer.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.address import AddressError, parse_address
from mailstack.interfaces import IUserDB


@implementer(ICredentialsChecker)
class UserChecker:
    """Checks ``IUsernamePassword`` against an ``IUserDB``; avatarId = user key."""

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, users: IUserDB, run_blocking: Callable[..., Deferred]) -> None:
        self.users = users
        self.run_blocking = run_blocking

    def requestAvatarId(self, credentials: Any) -> Deferred:
        username = credentials.username
        try:
            if isinstance(username, bytes):
                username = username.decode("utf-8")
            key = parse_address(username).key
        except (UnicodeDecodeError, AddressError):
            return fail(UnauthorizedLogin("bad username"))
        d = self.run_blocking(self.users.check_password, key, credentials.password)

        def checked(ok: bool) -> str:
            if not ok:
                self.log.info("login failed for {user}", user=key)
                raise UnauthorizedLogin("bad credentials")
            return key

        return d.addCallback(checked)
