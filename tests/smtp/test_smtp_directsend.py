"""Tests for mailstack.directsend: a reply goes to the socket at once only when
nothing is pending, and otherwise through the transport, in order.

A real ``tcp.Server`` over a local ``socketpair`` (no network, no reactor
running: a MemoryReactor stands in, and ``doWrite`` is called by hand).
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailstack.directsend import receive, send


class _Producer:
    def __init__(self) -> None:
        self.paused = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class SocketPairBase(SynchronousTestCase):
    """A ``tcp.Server`` over one end of a socketpair; the test plays the client on the other."""

    def setUp(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        self.reactor = MemoryReactor()
        self.transport = tcp.Server(self.ours, Protocol(), ("127.0.0.1", 1025), None, 0, self.reactor)

    def received(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def fill_socket(self) -> None:
        """Send until the kernel takes nothing more: the next send is partial."""
        while True:
            try:
                self.ours.send(b"x" * 65536)
            except BlockingIOError:
                return


class DirectSendTests(SocketPairBase):
    def test_idleSendsAtOnce(self) -> None:
        """Nothing buffered: the bytes are on the socket now, and the transport does not start watching for
        writability."""
        send(self.transport, b"250 2.0.0 OK\r\n")
        self.assertEqual(self.received(), b"250 2.0.0 OK\r\n")
        self.assertNotIn(self.transport, self.reactor.getWriters())
        self.assertEqual(self.transport.dataBuffer, b"")

    def test_partialSendBuffersRestInOrder(self) -> None:
        """What the kernel refuses is buffered by the transport; a later send queues behind it, never overtakes it."""
        self.fill_socket()
        self.received()  # the peer drains; the socket takes some, not all, of a big write
        big = bytes(range(256)) * 4096
        send(self.transport, big)
        self.assertIn(self.transport, self.reactor.getWriters())
        got = self.received()  # room again, but the rest of ``big`` is still ahead of anything new
        send(self.transport, b"NE")  # behind the rest, in the transport's _tempDataBuffer
        got += self.received()
        self.assertTrue(big.startswith(got))
        self.transport.doWrite()  # the rest moves to dataBuffer, part of it is sent
        got += self.received()
        self.assertTrue(self.transport.dataBuffer)
        send(self.transport, b"XT")  # behind dataBuffer
        got += self.received()
        self.assertTrue(big.startswith(got))
        for _ in range(1000):
            if not self.transport.dataBuffer and not self.transport._tempDataLen:
                break
            self.transport.doWrite()
            got += self.received()
        self.assertEqual(got, big + b"NEXT")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_fullSocketKeepsBackPressure(self) -> None:
        """A send the kernel cannot take at all is buffered, and a big buffer pauses the registered streaming
        producer."""
        producer = _Producer()
        self.transport.registerProducer(producer, True)
        self.fill_socket()
        send(self.transport, b"y" * (self.transport.bufferSize + 1))
        self.assertEqual(producer.paused, 1)
        self.assertIn(self.transport, self.reactor.getWriters())

    def test_afterLoseConnectionUsesTransport(self) -> None:
        """After loseConnection the transport decides: nothing is sent behind its back."""
        self.transport.loseConnection()
        send(self.transport, b"221 2.0.0 Bye\r\n")
        self.assertEqual(self.received(), b"")

    def test_tlsUsesTransport(self) -> None:
        """After startTLS (``transport.TLS``) the bytes must go through the TLS layer, never raw."""
        written: list[bytes] = []
        self.transport.TLS = True
        self.transport.write = written.append  # type: ignore[method-assign]
        send(self.transport, b"secret")
        self.assertEqual(written, [b"secret"])
        self.assertEqual(self.received(), b"")

    def test_deadPeerLeftToTransport(self) -> None:
        """A send error (peer gone) is not raised: the transport buffers the bytes and meets the error itself."""
        self.peer.close()
        send(self.transport, b"250 OK\r\n")
        self.assertIn(self.transport, self.reactor.getWriters())

    def test_otherTransportsWrite(self) -> None:
        """Any other transport (test transports, TLS wrappers) gets a plain write."""
        t = StringTransport()
        send(t, b"220 hi\r\n")
        self.assertEqual(t.value(), b"220 hi\r\n")


class ReceiveTests(SocketPairBase):
    """``receive``: input waiting on a plain ``tcp.Server``, or b"" and the transport's own read meets the rest."""

    def test_waitingBytes(self) -> None:
        """Bytes the peer sent come back, up to the size asked for."""
        self.peer.send(b"RETR 1\r\nDELE 1\r\n")
        self.assertEqual(receive(self.transport, 8), b"RETR 1\r\n")
        self.assertEqual(receive(self.transport, 100), b"DELE 1\r\n")

    def test_nothingYet(self) -> None:
        """Nothing waiting (EAGAIN): b"", nothing raised."""
        self.assertEqual(receive(self.transport, 100), b"")

    def test_endOfInputLeftToTransport(self) -> None:
        """At the end of input: b"", and the end is still there for the transport's read."""
        self.peer.shutdown(socket.SHUT_WR)
        self.assertEqual(receive(self.transport, 100), b"")
        self.assertEqual(self.ours.recv(100), b"")

    def test_notWithOutputPending(self) -> None:
        """While unsent output waits in the transport (the client is not reading), nothing is read."""
        self.peer.send(b"NOOP\r\n")
        self.transport.write(b"+OK\r\n")
        self.assertEqual(receive(self.transport, 100), b"")
        self.assertEqual(self.ours.recv(100), b"NOOP\r\n")

    def test_notUnderTLS(self) -> None:
        """After startTLS the bytes on the socket are TLS records for the TLS layer: none are read."""
        self.peer.send(b"\x17\x03\x03")
        self.transport.TLS = True
        self.assertEqual(receive(self.transport, 100), b"")

    def test_otherTransports(self) -> None:
        """Any other transport: b"" (its data comes through the reactor)."""
        self.assertEqual(receive(StringTransport(), 100), b"")
