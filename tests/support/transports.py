"""StringTransports that can do (or already do) TLS, as the server sessions see them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides, implementer


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can startTLS: records the context, then provides ISSLTransport.

    Also records each write, TCP_NODELAY and aborts.  The peer is ``host``
    unless ``peerAddress`` is given.
    """

    def __init__(self, host: str = "192.0.2.7", peerAddress: Any = None, hostAddress: Any = None) -> None:
        super().__init__(hostAddress=hostAddress, peerAddress=peerAddress or IPv4Address("TCP", host, 40000))
        self.tls_context: Any = None
        self.tls_started_at: int | None = None
        self.writes: list[bytes] = []
        self.nodelay = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_context = contextFactory
        self.tls_started_at = len(self.value())
        directlyProvides(self, ISSLTransport, ITLSTransport)

    def getHandle(self) -> Any:
        return SimpleNamespace(
            get_protocol_version_name=lambda: "TLSv1.3",
            get_cipher_name=lambda: "TLS_AES_256_GCM_SHA384",
        )

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class ImplicitTLSTransport(TLSStringTransport):
    """Transport of an ``ssl:`` listener (submissions, pop3s): TLS from the start."""

    def __init__(self, host: str = "192.0.2.7", peerAddress: Any = None, hostAddress: Any = None) -> None:
        super().__init__(host, peerAddress, hostAddress)
        directlyProvides(self, ISSLTransport)
