# -*- test-case-name: tests.auth.test_cred -*-
"""The ``twisted.cred`` checker and realm that SMTP AUTH (RFC 4954) and POP3 (RFC 1939, 5034) share.

The protocol builds ``UsernamePassword(username, password)`` from the client's
AUTH PLAIN/LOGIN or USER/PASS and asks this checker.  The username is an email
address, parsed and normalised with ``address.parse_address``; the avatar id is
the user key (``Address.key``, a str).  The Argon2 verification takes tens of
milliseconds, so it runs through ``run_blocking`` (the thread pool), never on the
reactor thread, unless the optional ``LoginCache`` (``auth/cache.py``) remembers
this password as verified against the hash stored now: then the answer comes at
once, without a pool thread.  Brute-force slowdown is the protocol's job
(``ILoginThrottle``, consulted before the checker), because only it knows the
peer; the cache only ever remembers successes, so it gives a guesser nothing.

``login_portal(checker)`` puts the checker behind a ``Portal`` whose realm
gives an ``IMailUser`` avatar: the protocols log in through it rather than
calling the checker, so another checker (LDAP, a PAM bridge) or a richer
avatar plugs in without touching them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mailstack.address import AddressError, parse_address
from mailstack.auth.cache import LoginCache
from mailstack.interfaces import IUserDB


@implementer(ICredentialsChecker)
class UserChecker:
    """Checks ``IUsernamePassword`` against an ``IUserDB``; avatarId = user key."""

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        users: IUserDB,
        run_blocking: Callable[..., Deferred],
        parallel: int = 4,
        cache: LoginCache | None = None,
    ) -> None:
        self.users = users
        self.run_blocking = run_blocking
        self.cache = cache
        # At most ``parallel`` Argon2 checks at once: each takes a core and
        # 19 MiB, and a login flood must not take the pool threads that
        # fsync accepted mail.
        self._slots = DeferredSemaphore(parallel)

    def requestAvatarId(self, credentials: Any) -> Deferred:
        username = credentials.username
        try:
            if isinstance(username, bytes):
                username = username.decode("utf-8")
            key = parse_address(username).key
        except (UnicodeDecodeError, AddressError):
            return fail(UnauthorizedLogin("bad username"))
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        cache = self.cache
        stored = self.users.stored_hash(key) if cache is not None else None
        if cache is not None and cache.hit(key, stored, password):
            return succeed(key)
        d = self._slots.run(self.run_blocking, self.users.check_password, key, password)

        def checked(ok: bool) -> str:
            if not ok:
                self.log.info("login failed for {user}", user=key)
                raise UnauthorizedLogin("bad credentials")
            # Remember only what was verified: if the hash changed during the
            # check, it is unknown which one the check saw.
            if cache is not None and stored is not None and self.users.stored_hash(key) == stored:
                cache.remember(key, stored, password)
            return key

        return d.addCallback(checked)


class IMailUser(Interface):
    """An authenticated mail user, as SMTP submission and POP3 see them."""

    key = Attribute("the user key (``Address.key``): login name and mailbox owner")


@implementer(IMailUser)
class MailUser:
    def __init__(self, key: str) -> None:
        self.key = key


@implementer(IRealm)
class MailRealm:
    """Turns an avatar id (the user key) into an ``IMailUser``."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if IMailUser not in interfaces:
            raise NotImplementedError("mailstack only provides IMailUser avatars")
        key = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        return IMailUser, MailUser(key), lambda: None


def login_portal(checker: ICredentialsChecker) -> Portal:
    """A Portal over ``checker`` with the mail realm."""
    return Portal(MailRealm(), [checker])


def login(portal: Portal, username: bytes, password: bytes) -> Deferred[str]:
    """Deferred firing with the user key, or failing with ``UnauthorizedLogin``."""
    d = portal.login(UsernamePassword(username, password), None, IMailUser)
    return d.addCallback(_avatar_key)


def _avatar_key(result: tuple[object, object, Callable[[], None]]) -> str:
    avatar = result[1]
    assert isinstance(avatar, MailUser)
    return avatar.key
