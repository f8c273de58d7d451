"""The private Twisted attributes mailstack relies on still exist and mean what the code assumes.

Three places use them, each behind one function with a fallback to Twisted's
public behaviour: ``directsend._idle_socket`` (``tcp.Server`` output buffers),
``service.raise_listen_errors`` (``StreamServerEndpointService._raiseSynchronously``)
and ``tap._replace_reactor_sigterm`` (the reactor's ``sigTerm``; that the reactor
installs it at start is checked in ``tests/test_service.py``).  These tests run
against the installed Twisted: if one fails after an upgrade, the fallback is
active in production and the code or the version bound in setup.cfg needs a look.
"""

from __future__ import annotations

import signal
import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from mailstack import directsend, service, tap


class DirectSendInternalsTests(SynchronousTestCase):
    """``tcp.Server`` keeps unsent output where ``directsend`` looks for it."""

    def setUp(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        self.transport = tcp.Server(self.ours, Protocol(), ("127.0.0.1", 1025), None, 0, MemoryReactor())

    def test_attributesExist(self) -> None:
        """A fresh tcp.Server has every attribute directsend reads, with the "idle" values."""
        t: Any = self.transport
        self.assertEqual(
            (t.TLS, t.connected, t.disconnecting, t._writeDisconnecting, t.dataBuffer, t._tempDataLen),
            (False, 1, False, False, b"", 0),
        )
        self.assertIs(t.socket, self.ours)
        self.assertIs(directsend._idle_socket(t), self.ours)

    def test_writeIsPending(self) -> None:
        """Bytes given to transport.write wait in those buffers until doWrite, so the next send queues."""
        self.transport.write(b"first")
        self.assertIsNone(directsend._idle_socket(self.transport))
        self.transport.doWrite()
        self.assertEqual(self.peer.recv(100), b"first")
        self.assertIs(directsend._idle_socket(self.transport), self.ours)

    def test_closingIsNotIdle(self) -> None:
        """After loseConnection the transport, not directsend, decides what goes out."""
        self.transport.loseConnection()
        self.assertIsNone(directsend._idle_socket(self.transport))

    def test_renamedInternalsFallBackToWrite(self) -> None:
        """Were ``_tempDataLen`` renamed, send would still deliver, through transport.write."""
        t: Any = self.transport
        del t._tempDataLen
        self.assertIsNone(directsend._idle_socket(t))
        written: list[bytes] = []
        t.write = written.append
        directsend.send(t, b"250 ok\r\n")
        self.assertEqual(written, [b"250 ok\r\n"])


class _Unbindable:
    """A server endpoint whose port is taken."""

    def listen(self, factory: Any) -> Deferred[Any]:
        return fail(CannotListenError("127.0.0.1", 25, OSError(98, "Address already in use")))


class ListenInternalsTests(SynchronousTestCase):
    def test_raiseSynchronouslyHonoured(self) -> None:
        """With raise_listen_errors, a port in use makes privilegedStartService raise (twistd exits 1)."""
        svc = StreamServerEndpointService(_Unbindable(), Factory())
        self.assertTrue(service.raise_listen_errors(svc))
        self.assertRaises(CannotListenError, svc.privilegedStartService)


class SigtermInternalsTests(SynchronousTestCase):
    def test_reactorHasSigTerm(self) -> None:
        """The reactor has the sigTerm method that its signal set-up installs, and ours replaces it."""
        reactor: Any = SelectReactor()
        self.assertTrue(callable(reactor.sigTerm))
        handler = lambda signum, frame: None  # noqa: E731
        tap._replace_reactor_sigterm(reactor, handler)
        self.assertIs(reactor.sigTerm, handler)

    def test_fallbackInstallsWhenRunning(self) -> None:
        """A reactor without sigTerm gets the handler installed once it runs."""

        class Reactor:
            def __init__(self) -> None:
                self.when_running: list[tuple[Any, ...]] = []

            def callWhenRunning(self, f: Any, *args: Any) -> None:
                self.when_running.append((f, *args))

        reactor = Reactor()
        handler = lambda signum, frame: None  # noqa: E731
        tap._replace_reactor_sigterm(reactor, handler)
        self.assertEqual(reactor.when_running, [(signal.signal, signal.SIGTERM, handler)])
