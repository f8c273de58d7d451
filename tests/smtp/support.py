"""Fakes for SMTP server unit tests: TLS-capable StringTransport, runtime, router, intake, checker, throttle."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides, implementer

from mailstack import config as configmod
from mailstack.address import Address
from mailstack.envelope import Destination
from mailstack.errors import PermanentFailure, Reply, TemporaryFailure
from mailstack.interfaces import IIncoming, IIntake, ILoginThrottle, IMessage, IRouter
from mailstack.pipeline import Pipeline
from mailstack.smtp.server import make_factory


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can startTLS: records the context, then provides ISSLTransport."""

    tls_context: Any = None

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_context = contextFactory
        self.tls_started_at = len(self.value())
        directlyProvides(self, ISSLTransport, ITLSTransport)

    def getHandle(self) -> Any:
        return SimpleNamespace(
            get_protocol_version_name=lambda: "TLSv1.3",
            get_cipher_name=lambda: "TLS_AES_256_GCM_SHA384",
        )


class ImplicitTLSTransport(TLSStringTransport):
    """Transport of an ``ssl:`` listener: TLS from the start."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        directlyProvides(self, ISSLTransport)


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


@implementer(IIncoming)
class FakeIncoming:
    def __init__(self, intake: "FakeIntake", envelope: Any) -> None:
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
        from mailstack.headers import HeaderReader

        reader = HeaderReader()
        reader.feed(data)
        reader.end()
        self.header = reader.fields
        self.size = len(data)
        self._data = data

    def run_blocking(self, reader: Any) -> Deferred:
        import io

        return succeed(reader(io.BytesIO(self._data)))


@implementer(IIntake)
class FakeIntake:
    def __init__(self) -> None:
        self.begun: list[FakeIncoming] = []
        self.committed: list[FakeIncoming] = []
        self.manual = False  # finish() returns an unfired Deferred
        self.fail_with: Exception | None = None

    def begin(self, envelope: Any) -> FakeIncoming:
        incoming = FakeIncoming(self, envelope)
        self.begun.append(incoming)
        return incoming


@implementer(ICredentialsChecker)
class FakeChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, passwords: dict[bytes, bytes] | None = None) -> None:
        self.passwords = passwords or {b"alice@example.org": b"secret", b"bob@example.org": b"hunter2"}
        self.manual = False
        self.pending: list[Deferred] = []
        self.seen: list[tuple[bytes, bytes]] = []

    def requestAvatarId(self, credentials: Any) -> Deferred:
        self.seen.append((credentials.username, credentials.password))
        if self.manual:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        if self.passwords.get(credentials.username.lower()) == credentials.password:
            return succeed(credentials.username.decode().lower())
        return fail(UnauthorizedLogin())


@implementer(ILoginThrottle)
class FakeThrottle:
    def __init__(self, delay: float = 2.0) -> None:
        self.delay = delay
        self.failures: list[tuple[str, str]] = []
        self.successes: list[tuple[str, str]] = []
        self.locked_accounts: set[str] = set()

    def locked(self, peer: str, account: str) -> bool:
        return account in self.locked_accounts

    def failed(self, peer: str, account: str) -> float:
        self.failures.append((peer, account))
        return self.delay

    def succeeded(self, peer: str, account: str) -> None:
        self.successes.append((peer, account))


class FakeAliases:
    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {
            "sales@example.org": ["alice@example.org", "carol@remote.test"],
            "info@example.org": ["sales@example.org"],
            "team@example.org": ["bob@example.org"],
        }

    def targets(self, key: str) -> list[str] | None:
        return self.table.get(key)


class FakeTLS:
    def __init__(self) -> None:
        self.context = object()

    def context_factory(self) -> Any:
        return self.context


def make_config(**sections: dict) -> Any:
    raw: dict[str, Any] = {"hostname": "mx.example.org", "domains": {"local": ["example.org"]}}
    raw.setdefault("smtp", {}).update({"max_message_size": 10000})
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return configmod.from_mapping(raw)


def make_runtime(**sections: dict) -> SimpleNamespace:
    clock = Clock()
    return SimpleNamespace(
        config=make_config(**sections),
        reactor=clock,
        clock=clock,
        run_blocking=None,
        users=None,
        aliases=FakeAliases(),
        checker=FakeChecker(),
        throttle=FakeThrottle(),
        tls=FakeTLS(),
        router=FakeRouter(),
        intake=FakeIntake(),
        pipeline=Pipeline([], clock),
    )


class Session:
    """One server protocol on a (TLS)StringTransport, with a conversation helper."""

    def __init__(
        self,
        kind: str = "smtp",
        runtime: Any = None,
        peer: str = "192.0.2.7",
        transport: Any = None,
        factory: Any = None,
    ) -> None:
        self.runtime = runtime or make_runtime()
        self.factory = factory or make_factory(kind, self.runtime)
        addr = IPv4Address("TCP", peer, 40000)
        self.proto = self.factory.buildProtocol(addr)
        if transport is None:
            transport = ImplicitTLSTransport(peerAddress=addr) if kind == "submissions" else TLSStringTransport(peerAddress=addr)
        self.transport = transport
        self.proto.makeConnection(transport)
        self.banner = transport.value()
        transport.clear()

    @property
    def clock(self) -> Clock:
        return self.runtime.reactor

    @property
    def intake(self) -> FakeIntake:
        return self.runtime.intake

    def send(self, data: bytes) -> bytes:
        """Feed raw bytes in one read; return what the server wrote since the last call."""
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def send_bytewise(self, data: bytes) -> bytes:
        self.transport.clear()
        for i in range(len(data)):
            self.proto.dataReceived(data[i : i + 1])
        return self.take()

    def talk(self, *lines: bytes) -> list[bytes]:
        """Send each line (CRLF added) in its own read; the reply lines, CRLF removed."""
        self.transport.clear()
        for line in lines:
            self.proto.dataReceived(line + b"\r\n")
        return self.take().split(b"\r\n")[:-1]

    def codes(self, *lines: bytes) -> list[bytes]:
        """Like talk, but only the final line of each reply, first 9 bytes ("250 2.1.0")."""
        return [line[:9] for line in self.talk(*lines) if line[3:4] == b" "]

    def last(self, *lines: bytes) -> bytes:
        return self.talk(*lines)[-1]

    def login(self, user: bytes = b"alice@example.org", password: bytes = b"secret") -> None:
        """EHLO, STARTTLS if needed, AUTH PLAIN."""
        import base64

        self.talk(b"EHLO client.test")
        if not ISSLTransport.providedBy(self.transport):
            self.talk(b"STARTTLS")
            self.talk(b"EHLO client.test")
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        reply = self.last(b"AUTH PLAIN " + token)
        assert reply.startswith(b"235 2.7.0"), reply

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting
