"""Fakes of the parts behind the server sessions; ``tests/support/test_fakes.py`` verifies each
against the interface it stands for."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from mailstack.address import Address, mailbox_components
from mailstack.envelope import Destination
from mailstack.errors import PermanentFailure, Reply, TemporaryFailure
from mailstack.headers import HeaderReader
from mailstack.interfaces import (
    IAliasDB,
    IIncoming,
    IIntake,
    ILoginThrottle,
    ILoginTicket,
    IMessage,
    IRouter,
    ITLSSettings,
    IUserDB,
)


def run_blocking(f: Callable[..., Any], *a: Any, **kw: Any) -> Deferred:
    """``runtime.run_blocking`` without a thread pool: runs ``f`` at once."""
    return maybeDeferred(f, *a, **kw)


@implementer(ITLSSettings, IOpenSSLContextFactory)
class FakeTLS:
    """TLS settings without certificates.

    ``context_factory()`` hands out ``context`` (the servers pass it to
    ``startTLS``); as an iosim TLS context both ends "verify" unless ``ok`` is
    False.
    """

    def __init__(self, ok: bool = True, name: str = "") -> None:
        self.ok = ok
        self.name = name
        self.context = object()

    def context_factory(self) -> Any:
        return self.context

    def getContext(self) -> Any:
        raise AssertionError("unit tests make no real TLS connections")

    def iosimVerify(self, other: Any) -> bool:
        return self.ok and getattr(other, "ok", True)


@implementer(ICredentialsChecker)
class FakeChecker:
    """Users ``alice``/``bob`` at example.org and localhost; avatarId is the lowercase key.

    ``manual``: answers wait in ``pending``; ``error``: every check fails with it.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[bytes, bytes] | None = None) -> None:
        self.users = users if users is not None else {
            b"alice@example.org": b"secret",
            b"bob@example.org": b"hunter2",
            b"alice@localhost": b"secret",
            b"bob@localhost": b"hunter2",
        }
        self.calls: list[tuple[bytes, bytes]] = []
        self.manual = False
        self.pending: list[Deferred] = []
        self.error: Exception | None = None

    def requestAvatarId(self, credentials: Any) -> Deferred:
        self.calls.append((credentials.username, credentials.password))
        if self.error is not None:
            return fail(self.error)
        if self.manual:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        key = credentials.username.lower()
        if self.users.get(key) == credentials.password:
            return succeed(key.decode())
        return fail(UnauthorizedLogin())


@implementer(IUserDB)
class FakeUsers:
    """The users of a ``FakeChecker`` (the same dict): delete one or change a password
    here and the checker sees it too.  The stored "hash" is the password itself."""

    def __init__(self, users: dict[bytes, bytes]) -> None:
        self.users = users

    def exists(self, key: str) -> bool:
        return key.encode() in self.users

    def check_password(self, key: str, password: bytes) -> bool:
        return self.users.get(key.encode()) == password

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self.users)

    def stored_hash(self, key: str) -> str | None:
        password = self.users.get(key.encode())
        return None if password is None else password.decode()


@implementer(ILoginTicket)
class FakeTicket:
    """One reserved attempt of ``FakeThrottle``; records which verdict it got."""

    def __init__(self, throttle: FakeThrottle, peer: str, account: str) -> None:
        self.throttle = throttle
        self.key = (peer, account)
        self.delay = throttle.pre_delay

    def succeeded(self) -> None:
        self.throttle.in_flight.remove(self.key)
        self.throttle.successes.append(self.key)

    def failed(self) -> Deferred[float]:
        self.throttle.in_flight.remove(self.key)
        self.throttle.failures.append(self.key)
        return succeed(self.throttle.delay)

    def abandoned(self) -> None:
        self.throttle.in_flight.remove(self.key)
        self.throttle.abandoned.append(self.key)


@implementer(ILoginThrottle)
class FakeThrottle:
    """Refuses ``locked_out`` peers or accounts; every failure asks for ``delay``; tickets wait ``pre_delay``."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.pre_delay = 0.0
        self.locked_out: set[str] = set()
        self.in_flight: list[tuple[str, str]] = []
        self.failures: list[tuple[str, str]] = []
        self.successes: list[tuple[str, str]] = []
        self.abandoned: list[tuple[str, str]] = []

    def begin(self, peer: str, account: str) -> Deferred[ILoginTicket | None]:
        if peer in self.locked_out or account in self.locked_out:
            return succeed(None)
        self.in_flight.append((peer, account))
        return succeed(FakeTicket(self, peer, account))


@implementer(IRouter)
class FakeRouter:
    """Local domain example.org with users alice and bob; anything else is remote."""

    def __init__(self, users: tuple[str, ...] = ("alice@example.org", "bob@example.org")) -> None:
        self.users = set(users)
        self.calls: list[tuple[Address, bool]] = []

    def resolve(self, address: Address, authenticated: bool) -> list:
        self.calls.append((address, authenticated))
        if address.domain == "example.org":
            if address.key in self.users:
                return [Destination(address, address, True)]
            if address.is_postmaster:
                return [Destination(Address("alice", "example.org"), address, True)]
            if address.local == "tempfail":
                raise TemporaryFailure(Reply(451, "4.3.0", "Try later"))
            raise PermanentFailure(Reply(550, "5.1.1", "No such user here"))
        if not authenticated:
            raise PermanentFailure(Reply(550, "5.7.1", "Relay access denied"))
        return [Destination(address, address, False)]


@implementer(IAliasDB)
class FakeAliases:
    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {
            "sales@example.org": ["alice@example.org", "carol@remote.test"],
            "info@example.org": ["sales@example.org"],
            "team@example.org": ["bob@example.org"],
        }

    def targets(self, key: str) -> list[str] | None:
        return self.table.get(key)


@implementer(IIncoming)
class FakeIncoming:
    """One message given to ``FakeIntake``; ``commit()`` fires a manual ``finish()``."""

    def __init__(self, intake: FakeIntake, envelope: Any) -> None:
        self.intake = intake
        self.envelope = envelope
        self.chunks: list[bytes] = []
        self.finished: Deferred | None = None
        self.aborted = False

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert not self.aborted
        self.chunks.append(data)

    def message(self) -> IMessage:
        return FakeMessage(self.data)

    def finish(self, changes: Any = None) -> Deferred:
        self.changes = changes
        if self.intake.manual:
            self.finished = Deferred()
            return self.finished
        if self.intake.fail_with is not None:
            return fail(self.intake.fail_with)
        self.intake.committed.append(self)
        return succeed(f"Q{len(self.intake.committed)}")

    def commit(self, queue_id: str = "QM") -> None:
        """Fire a manual finish()."""
        self.intake.committed.append(self)
        assert self.finished is not None
        self.finished.callback(queue_id)

    def abort(self) -> None:
        self.aborted = True


@implementer(IMessage)
class FakeMessage:
    """The checks' view of a FakeIncoming's bytes: header fields, no thread pool."""

    def __init__(self, data: bytes) -> None:
        reader = HeaderReader()
        reader.feed(data)
        reader.end()
        self.header = reader.fields
        self.size = len(data)
        self._data = data

    def run_blocking(self, reader: Any) -> Deferred:
        return succeed(reader(io.BytesIO(self._data)))


@implementer(IIntake)
class FakeIntake:
    """Records begun and committed messages; ``manual`` or ``fail_with`` change ``finish()``."""

    def __init__(self) -> None:
        self.begun: list[FakeIncoming] = []
        self.committed: list[FakeIncoming] = []
        self.manual = False  # finish() returns an unfired Deferred
        self.fail_with: Exception | None = None

    def begin(self, envelope: Any) -> FakeIncoming:
        incoming = FakeIncoming(self, envelope)
        self.begun.append(incoming)
        return incoming

    def wait_idle(self) -> Deferred:
        return succeed(None)


class FakeMaildirs:
    """``path_for`` like storage.maildir.MaildirStore: root/domain/local."""

    def __init__(self, root: str) -> None:
        self.root = root

    def path_for(self, address: Address) -> str:
        domain, local = mailbox_components(address)
        return os.path.join(self.root, domain, local)
