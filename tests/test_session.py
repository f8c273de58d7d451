"""Tests for mailstack.session: the engine under SMTP and POP3, driven through a tiny protocol."""

from __future__ import annotations

import socket
from typing import ClassVar

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack.connlimit import TOTAL, ConnectionLimiter
from mailstack.interfaces import IConnectionSlots
from mailstack.session import CLOSE_GRACE, INLINE_BACKOFF, CommandSession, SessionGroup
from tests.support.transports import TLSStringTransport


class Echo(CommandSession):
    """ECHO x -> x; WAIT blocks on a Deferred; SLOW blocks 5 s; RAW takes bytes up to END; TLS starts TLS."""

    limit_replies: ClassVar[dict[str, bytes]] = {TOTAL: b"BUSY\r\n"}
    shutdown_reply = b"BYE\r\n"

    def __init__(self, clock: Clock, group: SessionGroup, limiter: ConnectionLimiter) -> None:
        super().__init__(clock, group, limiter)
        self.pending: list[Deferred] = []
        self.raw = b""
        self.timeouts = 0
        self.in_transaction = False
        self.dropped = -1

    def connectionMade(self) -> None:
        self._admit(self._start)

    def _start(self) -> None:
        self._queue(b"HELLO\r\n")
        self._flush()
        self._arm_timer()

    def max_line_length(self) -> int:
        return 20

    def line_too_long(self) -> None:
        self._queue(b"TOO LONG\r\n")

    def idle_timeout(self) -> float:
        return 30.0

    def timed_out(self) -> None:
        self.timeouts += 1
        self._queue(b"TIMEOUT\r\n")
        self._close()

    def idle(self) -> bool:
        return not self.in_transaction

    def handler_failed(self) -> None:
        self._queue(b"ERROR\r\n")

    def line_received(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        if verb == b"ECHO":
            self._queue(arg + b"\r\n")
        elif verb == b"WAIT":
            d: Deferred = Deferred()
            self.pending.append(d)
            self._wait(d, lambda result: self._queue(b"DONE %s\r\n" % result))
        elif verb == b"SLOW":
            self._delay(5, lambda: self._queue(b"SLOW DONE\r\n"))
        elif verb == b"MAIL":
            self.in_transaction = True
            self._queue(b"OK\r\n")
        elif verb == b"END":
            self.in_transaction = False
            self._queue(b"OK\r\n")
        elif verb == b"RAW":
            self._raw = self._take_raw
        elif verb == b"TLS":
            self._queue(b"GO\r\n")
            self.dropped = self._start_tls(object())

    def _take_raw(self, chunk: bytes) -> None:
        data = self.raw + chunk
        end = data.find(b".\r\n")
        if end < 0:
            self.raw = data
            return
        self.raw = data[:end]
        self._raw = None
        self._queue(b"GOT %d\r\n" % len(self.raw))
        self._unread(data[end + 3 :])


class PushOnly(Echo):
    """The POP3 flavour of back-pressure: a full write buffer stops processing, not reading."""

    stop_reading_when_write_full = False
    pause_input_at = 100


class Answering(Echo):
    """A client that waits for each reply: ``script`` lines reach the socket as each command is answered."""

    inline_reads = 3

    def __init__(self, clock: Clock, group: SessionGroup, limiter: ConnectionLimiter) -> None:
        super().__init__(clock, group, limiter)
        self.script: list[bytes] = []
        self.client: socket.socket | None = None

    def line_received(self, line: bytes) -> None:
        super().line_received(line)
        if self.script and self.client is not None:
            self.client.send(self.script.pop(0))


@implementer(IConnectionSlots)
class LaterSlots:
    """Slots answered later, as over AMP from the master process."""

    def __init__(self) -> None:
        self.asked: list[Deferred[str | None]] = []
        self.released: list[str] = []

    def acquire(self, host: str) -> Deferred[str | None]:
        self.asked.append(Deferred())
        return self.asked[-1]

    def release(self, host: str) -> None:
        self.released.append(host)


class Base(SynchronousTestCase):
    kind: type[Echo] = Echo

    def setUp(self) -> None:
        self.clock = Clock()
        self.group = SessionGroup(self.clock)
        self.limiter = ConnectionLimiter(2)

    def connect(self, host: str = "192.0.2.7") -> Echo:
        proto = self.kind(self.clock, self.group, self.limiter)
        proto.makeConnection(TLSStringTransport(host))
        proto.transport.clear()
        proto.transport.writes.clear()
        return proto

    def feed(self, proto: Echo, data: bytes) -> bytes:
        proto.transport.clear()
        proto.dataReceived(data)
        return proto.transport.value()


class FramingTests(Base):
    def test_oneWritePerRead(self) -> None:
        """Lines of one read are answered in one write; a line split over reads is joined."""
        proto = self.connect()
        self.assertEqual(self.feed(proto, b"ECHO a\r\nECHO b\r\nECHO c"), b"a\r\nb\r\n")
        self.assertEqual(proto.transport.writes, [b"a\r\nb\r\n"])
        self.assertEqual(self.feed(proto, b"d\r\n"), b"cd\r\n")
        self.assertEqual(proto._buf, b"")

    def test_overlongLineSkipped(self) -> None:
        """An overlong line gets one answer, complete or spread over reads, and the session stays in step."""
        proto = self.connect()
        self.assertEqual(self.feed(proto, b"ECHO " + b"x" * 30 + b"\r\nECHO ok\r\n"), b"TOO LONG\r\nok\r\n")
        self.assertEqual(self.feed(proto, b"y" * 50), b"TOO LONG\r\n")
        self.assertEqual(self.feed(proto, b"y" * 50 + b"\r"), b"")
        self.assertEqual(self.feed(proto, b"\nECHO again\r\n"), b"again\r\n")

    def test_rawConsumer(self) -> None:
        """A raw consumer takes the bytes instead of the line splitter and hands back what follows its end."""
        proto = self.connect()
        self.assertEqual(self.feed(proto, b"RAW\r\nECHO not a command\r\n"), b"")
        self.assertEqual(self.feed(proto, b".\r\nECHO after\r\n"), b"GOT 20\r\nafter\r\n")

    def test_startTLSDiscardsPipelined(self) -> None:
        """Input behind the TLS command is dropped (it came in plaintext); the reply goes out first."""
        proto = self.connect()
        self.assertEqual(self.feed(proto, b"TLS\r\nECHO injected\r\n"), b"GO\r\n")
        self.assertEqual(proto.dropped, len(b"ECHO injected\r\n"))
        self.assertEqual(proto.transport.tls_started_at, len(b"GO\r\n"))


class OrderTests(Base):
    def test_waitHoldsLaterCommands(self) -> None:
        """Commands behind one waiting on a Deferred are answered only after it (RFC 2920 section 3)."""
        proto = self.connect()
        self.assertEqual(self.feed(proto, b"WAIT\r\nECHO later\r\n"), b"")
        proto.transport.clear()
        proto.pending[0].callback(b"1")
        self.assertEqual(proto.transport.value(), b"DONE 1\r\nlater\r\n")

    def test_synchronousResult(self) -> None:
        """A Deferred that already fired does not hold anything."""
        proto = self.connect()
        proto.line_received = lambda line: proto._then(lambda r: proto._queue(b"R %s\r\n" % r), lambda: b"now")
        self.assertEqual(self.feed(proto, b"x\r\ny\r\n"), b"R now\r\nR now\r\n")

    def test_delay(self) -> None:
        """A delay holds the session on the injected clock."""
        proto = self.connect()
        self.assertEqual(self.feed(proto, b"SLOW\r\nECHO later\r\n"), b"")
        proto.transport.clear()
        self.clock.advance(5)
        self.assertEqual(proto.transport.value(), b"SLOW DONE\r\nlater\r\n")

    def test_handlerFailure(self) -> None:
        """A handler that raises is answered by handler_failed and the session goes on."""
        proto = self.connect()
        d: Deferred = Deferred()
        proto.line_received = lambda line: proto._wait(d, lambda r: 1 / 0)
        self.feed(proto, b"x\r\n")
        proto.transport.clear()
        d.callback(None)
        self.assertEqual(proto.transport.value(), b"ERROR\r\n")


class BackPressureTests(Base):
    def test_fullWriteBufferStopsReading(self) -> None:
        """By default a full write buffer pauses reading, and resuming undoes it."""
        proto = self.connect()
        proto.pauseProducing()
        self.assertEqual(proto.transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(proto.transport.producerState, "producing")

    def test_handshakePausesIgnored(self) -> None:
        """While a TLS handshake runs, the transport's pauses do not stop our reads."""
        proto = self.connect()
        self.feed(proto, b"TLS\r\n")
        proto.pauseProducing()
        self.assertEqual(proto.transport.producerState, "producing")

    def test_inputBehindBlockedCommandBounded(self) -> None:
        """Input piling up behind a blocked command pauses reading; it resumes once the command ends."""
        proto = self.connect()
        self.feed(proto, b"WAIT\r\n" + b"ECHO x\r\n" * 40000)
        self.assertEqual(proto.transport.producerState, "paused")
        proto.pending[0].callback(b"1")
        self.assertEqual(proto.transport.producerState, "producing")


class PushOnlyBackPressureTests(Base):
    kind = PushOnly

    def test_fullWriteBufferStopsProcessing(self) -> None:
        """The other flavour: reading goes on (up to pause_input_at), commands wait until resumeProducing."""
        proto = self.connect()
        proto.pauseProducing()
        self.assertEqual(self.feed(proto, b"ECHO a\r\n"), b"")
        self.assertEqual(proto.transport.producerState, "producing")
        self.feed(proto, b"ECHO b\r\n" * 20)
        self.assertEqual(proto.transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(proto.transport.value(), b"a\r\n" + b"b\r\n" * 20)
        self.assertEqual(proto.transport.producerState, "producing")


class TimerTests(Base):
    def assertTimesOutAfter(self, proto: Echo, seconds: float, last: float) -> None:
        """No timeout up to ``last`` seconds before ``seconds`` from now; one at exactly ``seconds``."""
        self.clock.advance(seconds - last)
        self.assertEqual(proto.timeouts, 0)
        self.clock.advance(last)
        self.assertEqual(proto.timeouts, 1)

    def test_idleTimeout(self) -> None:
        """The idle timer runs on the injected clock and is reset by input."""
        proto = self.connect()
        self.clock.advance(20)
        self.feed(proto, b"ECHO a\r\n")
        self.assertTimesOutAfter(proto, 30, last=10)
        self.assertTrue(proto.transport.disconnecting)

    def test_inputOnlyNotesTheTime(self) -> None:
        """Input does not touch the pending DelayedCall; when it comes due early
        the timer waits out the rest, so the timeout still falls exactly
        ``idle_timeout()`` after the last input."""
        proto = self.connect()
        [call] = self.clock.getDelayedCalls()
        due = call.getTime()
        for _ in range(3):
            self.clock.advance(7)
            self.feed(proto, b"ECHO a\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [call])
        self.assertEqual(call.getTime(), due)
        # 30 s after the last input, at t=51: well after the first due time (t=30).
        self.assertTimesOutAfter(proto, 30, last=1)

    def test_shorterTimeoutMovesTheTimer(self) -> None:
        """A read after which the idle timeout is shorter (SMTP leaving DATA)
        brings the pending timer forward."""
        proto = self.connect()
        proto.idle_timeout = lambda: 5.0  # type: ignore[method-assign]
        self.clock.advance(1)
        self.feed(proto, b"ECHO a\r\n")
        self.assertTimesOutAfter(proto, 5, last=0.5)

    def test_timerWhileBlockedWaitsForTheCommand(self) -> None:
        """The idle period restarts when a blocked command finishes, not at the input before it."""
        proto = self.connect()
        self.feed(proto, b"SLOW\r\n")
        self.clock.advance(5)  # SLOW DONE: idle from here
        self.assertTimesOutAfter(proto, 30, last=1)

    def test_closeAbortsAfterGrace(self) -> None:
        """A closed connection that does not go away is aborted after CLOSE_GRACE; connectionLost leaves no timer."""
        proto = self.connect()
        self.clock.advance(30)
        self.assertFalse(proto.transport.aborted)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(proto.transport.aborted)
        other = self.connect()
        other.connectionLost()
        proto.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LimitAndDrainTests(Base):
    def test_connectionCap(self) -> None:
        """Beyond the limiter's cap a connection gets the limit reply and is closed; a lost one frees its slot."""
        first = self.connect()
        self.connect()
        refused = self.kind(self.clock, self.group, self.limiter)
        refused.makeConnection(TLSStringTransport())
        self.assertEqual(refused.transport.value(), b"BUSY\r\n")
        self.assertTrue(refused.transport.disconnecting)
        refused.connectionLost()
        first.connectionLost()
        self.assertEqual(self.limiter.total, 1)
        again = self.kind(self.clock, self.group, self.limiter)
        again.makeConnection(TLSStringTransport())
        self.assertEqual(again.transport.value(), b"HELLO\r\n")

    def test_drainFiresWhenLastSessionGoes(self) -> None:
        """Idle sessions are told and closed at once, busy ones after their transaction; the Deferred
        fires at the last connectionLost, without polling; new connections are refused meanwhile."""
        idle, busy = self.connect(), self.connect()
        self.feed(busy, b"MAIL\r\n")
        d = self.group.drain(10)
        self.assertEqual(idle.transport.value(), b"BYE\r\n")
        self.assertFalse(busy.transport.disconnecting)
        late = self.kind(self.clock, self.group, self.limiter)
        late.makeConnection(TLSStringTransport())
        self.assertEqual(late.transport.value(), b"BYE\r\n")
        self.assertEqual(self.feed(busy, b"END\r\n"), b"OK\r\nBYE\r\n")
        idle.connectionLost()
        self.assertNoResult(d)
        busy.connectionLost()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drainTimeout(self) -> None:
        """Sessions still there after the timeout are dropped and the Deferred fires."""
        busy = self.connect()
        self.feed(busy, b"MAIL\r\n")
        d = self.group.drain(10)
        self.clock.advance(10)
        self.successResultOf(d)
        self.assertTrue(busy.transport.aborted)

    def test_drainWithoutSessions(self) -> None:
        """With no session the drain is over at once."""
        self.successResultOf(self.group.drain(10))


class LaterAdmissionTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.slots = LaterSlots()
        verifyObject(IConnectionSlots, self.slots)

    def start(self) -> Echo:
        proto = self.kind(self.clock, self.group, self.slots)
        proto.makeConnection(TLSStringTransport("192.0.2.7"))
        return proto

    def test_greetingWaitsForTheSlot(self) -> None:
        """Until the caps answer, nothing is said and the transport is not read; then the greeting."""
        proto = self.start()
        self.assertEqual(proto.transport.value(), b"")
        self.assertEqual(proto.transport.producerState, "paused")
        self.slots.asked[0].callback(None)
        self.assertEqual(proto.transport.value(), b"HELLO\r\n")
        self.assertEqual(proto.transport.producerState, "producing")
        self.assertEqual(self.feed(proto, b"ECHO a\r\n"), b"a\r\n")

    def test_refusedLater(self) -> None:
        """A cap reached answers the limit reply and closes, taking no slot to give back."""
        proto = self.start()
        self.slots.asked[0].callback(TOTAL)
        self.assertEqual(proto.transport.value(), b"BUSY\r\n")
        self.assertTrue(proto.transport.disconnecting)
        proto.connectionLost()
        self.assertEqual(self.slots.released, [])

    def test_goneBeforeTheAnswer(self) -> None:
        """A client gone before its slot was granted gives the slot back at once and is never greeted."""
        proto = self.start()
        proto.connectionLost()
        self.slots.asked[0].callback(None)
        self.assertEqual(self.slots.released, ["192.0.2.7"])
        self.assertEqual(proto.transport.value(), b"")

    def test_drainWhileWaiting(self) -> None:
        """A drain that began while the slot was asked: the slot goes back and the client is told."""
        proto = self.start()
        self.group.drain(10)
        self.slots.asked[0].callback(None)
        self.assertEqual(proto.transport.value(), b"BYE\r\n")
        self.assertEqual(self.slots.released, ["192.0.2.7"])

    def test_noAnswerCloses(self) -> None:
        """The caps cannot be asked (the master is gone): the connection is closed, nothing greeted."""
        proto = self.start()
        self.slots.asked[0].errback(ConnectionError("master gone"))
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(proto.transport.value(), b"")
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)


class InlineReadTests(Base):
    """Commands already on the socket are taken without a reactor turn, within bounds."""

    kind = Answering

    def connect(self, host: str = "192.0.2.7") -> Echo:
        # A loopback TCP pair: the session sets TCP_NODELAY, which a socketpair refuses.
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
        for sock in (ours, client):
            sock.setblocking(False)
            self.addCleanup(sock.close)
        proto = self.kind(self.clock, self.group, self.limiter)
        proto.client = client  # type: ignore[attr-defined]
        proto.makeConnection(tcp.Server(ours, proto, (host, 1025), None, 0, MemoryReactor()))
        self.assertEqual(client.recv(100), b"HELLO\r\n")
        self.ours, self.client = ours, client
        return proto

    def unread(self) -> bytes:
        """What the client sent that the session has not read."""
        try:
            return self.ours.recv(1000)
        except BlockingIOError:
            return b""

    def test_waitingCommandsTaken(self) -> None:
        """After a read's reply, commands the client sent meanwhile are read and
        answered at once, in order, up to ``inline_reads`` of them per reactor read."""
        proto = self.connect()
        assert isinstance(proto, Answering)
        proto.script = [b"ECHO %d\r\n" % n for n in range(2, 7)]
        proto.dataReceived(b"ECHO 1\r\n")
        self.assertEqual(self.client.recv(100), b"1\r\n2\r\n3\r\n4\r\n")
        self.assertEqual(self.unread(), b"ECHO 5\r\n")  # left for the reactor

    def test_nothingWaitingBacksOff(self) -> None:
        """A read that finds nothing stops inline reads for the next INLINE_BACKOFF reactor reads."""
        proto = self.connect()
        proto.dataReceived(b"ECHO a\r\n")  # finds nothing after it
        self.client.send(b"ECHO b\r\n")
        for _ in range(INLINE_BACKOFF):
            proto.dataReceived(b"ECHO c\r\n")
        self.assertEqual(self.unread(), b"ECHO b\r\n")
        self.client.send(b"ECHO d\r\n")
        proto.dataReceived(b"ECHO e\r\n")
        self.assertEqual(self.unread(), b"")
        self.assertTrue(self.client.recv(1000).endswith(b"e\r\nd\r\n"))

    def test_notWhileBlocked(self) -> None:
        """Nothing is read behind a command that waits: one command at a time."""
        proto = self.connect()
        self.client.send(b"ECHO b\r\n")
        proto.dataReceived(b"WAIT\r\n")
        self.assertEqual(self.unread(), b"ECHO b\r\n")

    def test_offByDefault(self) -> None:
        """A session class that does not ask for inline reads (SMTP) only reads through the reactor."""
        self.kind = Echo
        proto = self.connect()
        self.client.send(b"ECHO b\r\n")
        proto.dataReceived(b"ECHO a\r\n")
        self.assertEqual(self.unread(), b"ECHO b\r\n")
