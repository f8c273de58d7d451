"""SMTP server unit tests: a runtime over the shared fakes (``tests.support``) and a conversation helper."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock

from mailstack import config as configmod
from mailstack.runtime import Runtime
from mailstack.smtp.factory import make_factory
from tests.support.fakes import FakeIntake, FakeThrottle
from tests.support.runtime import fake_runtime
from tests.support.transports import ImplicitTLSTransport, TLSStringTransport


def make_config(**sections: dict) -> Any:
    raw: dict[str, Any] = {"hostname": "mx.example.org", "domains": {"local": ["example.org"]}}
    # Most tests feed a whole conversation in one read, DATA content included:
    # the rule against that (smtp.forbid_unauth_pipelining) is tested on its own.
    raw.setdefault("smtp", {}).update({"max_message_size": 10000, "forbid_unauth_pipelining": False})
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return configmod.from_mapping(raw)


def make_runtime(**sections: dict) -> Runtime:
    """A runtime over fakes; failed logins are answered after 2 s (the throttle's delay)."""
    return fake_runtime(make_config(**sections), throttle=FakeThrottle(delay=2.0))


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
            transport = (
                ImplicitTLSTransport(peerAddress=addr)
                if kind == "submissions"
                else TLSStringTransport(peerAddress=addr)
            )
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
