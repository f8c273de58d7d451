"""Fakes for the POP3 tests: runtime, checker, throttle, Maildir writer, TLS transport."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from types import SimpleNamespace
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides, implementer

from mailstack import config as configmod
from mailstack.address import Address, mailbox_components
from mailstack.interfaces import ILoginThrottleCompat


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that accepts STLS: records the context, becomes ISSLTransport."""

    def __init__(self, host: str = "192.0.2.7") -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self.tls_context: Any = None
        self.writes: list[bytes] = []
        self.nodelay = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def startTLS(self, context: Any) -> None:
        self.tls_context = context
        directlyProvides(self, ISSLTransport)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class SSLStringTransport(TLSStringTransport):
    """Already TLS, as on the pop3s listener."""

    def __init__(self, host: str = "192.0.2.7") -> None:
        super().__init__(host)
        directlyProvides(self, ISSLTransport)


@implementer(ICredentialsChecker)
class FakeChecker:
    """Users ``{b"alice@localhost": b"secret"}``; avatarId is the lowercase key."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[bytes, bytes] | None = None) -> None:
        self.users = users if users is not None else {b"alice@localhost": b"secret", b"bob@localhost": b"hunter2"}
        self.calls: list[tuple[bytes, bytes]] = []
        self.error: Exception | None = None

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[str]":
        self.calls.append((credentials.username, credentials.password))
        if self.error is not None:
            return defer.fail(self.error)
        key = credentials.username.lower()
        if self.users.get(key) == credentials.password:
            return defer.succeed(key.decode())
        return defer.fail(UnauthorizedLogin())


@implementer(ILoginThrottleCompat)
class FakeThrottle:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.locked_out: set[str] = set()
        self.failures: list[tuple[str, str]] = []
        self.successes: list[tuple[str, str]] = []

    def locked(self, peer: str, account: str) -> bool:
        return peer in self.locked_out or account in self.locked_out

    def failed(self, peer: str, account: str) -> float:
        self.failures.append((peer, account))
        return self.delay

    def succeeded(self, peer: str, account: str) -> None:
        self.successes.append((peer, account))


class FakeMaildirs:
    """``path_for`` like storage.maildir.MaildirStore: root/domain/local."""

    def __init__(self, root: str) -> None:
        self.root = root

    def path_for(self, address: Address) -> str:
        domain, local = mailbox_components(address)
        return os.path.join(self.root, domain, local)


class FakeTLS:
    def __init__(self) -> None:
        self.context = object()

    def context_factory(self) -> Any:
        return self.context


def sync_run_blocking(f: Any, *a: Any, **kw: Any) -> "defer.Deferred[Any]":
    return defer.maybeDeferred(f, *a, **kw)


class FakeRuntime(SimpleNamespace):
    """A runtime with just what POP3 uses (weakly referenceable, like the real one)."""

    __slots__ = ("__weakref__",)
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


def make_runtime(root: str, **config_overrides: Any) -> SimpleNamespace:
    raw: dict[str, Any] = {"data_dir": root}
    for dotted, value in config_overrides.items():
        section, name = dotted.split("__")
        raw.setdefault(section, {})[name] = value
    cfg = configmod.from_mapping(raw, base=root)
    return FakeRuntime(
        config=cfg,
        reactor=Clock(),
        run_blocking=sync_run_blocking,
        checker=FakeChecker(),
        throttle=FakeThrottle(),
        tls=FakeTLS(),
        maildirs=FakeMaildirs(os.path.join(root, "mail")),
    )


_seq = itertools.count(1)


def write_message(maildir: str, data: bytes, sub: str = "new", when: int = 1700000000, info: str = "") -> str:
    """Write a message file the way a Maildir deliverer does; returns the file name."""
    for s in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, s), exist_ok=True)
    n = next(_seq)
    name = f"{when}.M{n}P100Q{n}.test,S={len(data)}{info}"
    with open(os.path.join(maildir, sub, name), "wb") as f:
        f.write(data)
    return name


def temp_dir(case: Any) -> str:
    """A fresh directory outside the working tree, removed after the test."""
    path = tempfile.mkdtemp(prefix="mailstack-pop3-")
    case.addCleanup(shutil.rmtree, path, True)
    return path
