"""The outbound SMTP client against a scripted in-memory server."""

from __future__ import annotations

import io

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.delivery.replies import TIMEOUT
from mailstack.errors import Reply
from mailstack.interfaces import IMessageSource
from mailstack.smtp.client import HostFailure, SMTPClientProtocol
from mailstack.smtp.data import CHUNK, BodyProducer, DataEncoder, FileSource, MemorySource
from mailstack.smtp.wire import make_reply
from tests.queue.outbound_fakes import FakeSMTPServer, FakeTLS, connect_pair, drive

MESSAGE = b"Subject: hi\r\nFrom: a@b.test\r\n\r\nHello\r\n.leading dot\r\nbye\r\n"


class EncoderTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Bare CR and LF become CRLF, NUL goes, leading dots are doubled, the end is CRLF.CRLF."""
        cases = [
            (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
            (b"a\nb", b"a\r\nb\r\n.\r\n"),
            (b".x\r\n", b"..x\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            # SMTP smuggling sequences: none may end DATA early at the remote
            (b"a\n.\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r.\rb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n.\rb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n.\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n\x00.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n.\r\r\nb", b"a\r\n..\r\n\r\nb\r\n.\r\n"),
            (b"", b".\r\n"),
            (b"end\r", b"end\r\n.\r\n"),
        ]
        for raw, wire in cases:
            self.assertEqual(DataEncoder().encode(raw), wire, raw)

    def test_chunkBoundaries(self) -> None:
        """Splitting the input anywhere gives the same output."""
        raw = b"x\r\n.a\r\rb\n.\r\n\r.z\n" * 3
        whole = DataEncoder().encode(raw)
        for size in range(1, 8):
            enc = DataEncoder()
            out = b"".join(enc.feed(raw[i : i + size]) for i in range(0, len(raw), size)) + enc.end()
            self.assertEqual(out, whole, size)
        self.assertNotIn(b"\r\n.\r\n", whole[:-3])


class ReplyTests(SynchronousTestCase):
    def test_makeReply(self) -> None:
        """Multi-line replies keep their text; the enhanced code comes from the first line."""
        r = make_reply(550, ["5.1.1 <x@y>: Recipient address rejected", "5.1.1 see https://help"])
        self.assertEqual(r, Reply(550, "5.1.1", "<x@y>: Recipient address rejected\nsee https://help"))
        self.assertEqual(make_reply(354, ["2.0.0 go ahead"]).enhanced, "")
        self.assertEqual(make_reply(250, ["ok"]), Reply(250, "", "ok"))


class WriteLog(StringTransport):
    """A StringTransport that also keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def connect(self, server: FakeSMTPServer, **kw) -> SMTPClientProtocol:
        kw.setdefault("tls", None)
        self.client = SMTPClientProtocol("me.test", self.clock, 30.0, **kw)
        self.server = server
        self.pumps = [connect_pair(server, self.client, self.clock)]
        return self.client

    def run_(self, d):
        drive(self.pumps, self.clock, d)
        return d

    def session(self, server: FakeSMTPServer, rcpts=("a@r.test", "b@r.test"), message=MESSAGE, **kw):
        c = self.connect(server, **kw)
        self.successResultOf(self.run_(c.handshake()))
        return self.run_(c.send("s@here.test", list(rcpts), MemorySource(message), len(message)))

    def test_pipelinedTransaction(self) -> None:
        """EHLO, pipelined MAIL/RCPT/DATA, the body dot-stuffed, a reply per recipient."""
        server = FakeSMTPServer()
        results = self.successResultOf(self.session(server))
        self.assertEqual(set(results), {"a@r.test", "b@r.test"})
        self.assertEqual(results["a@r.test"], Reply(250, "2.0.0", "Ok: queued"))
        self.assertEqual(server.commands[0], b"EHLO me.test")
        self.assertEqual(server.commands[1], b"MAIL FROM:<s@here.test> SIZE=%d BODY=8BITMIME" % len(MESSAGE))
        self.assertEqual(server.commands[2:5], [b"RCPT TO:<a@r.test>", b"RCPT TO:<b@r.test>", b"DATA"])
        self.assertEqual(server.messages[0][2], MESSAGE.replace(b"\r\n.leading", b"\r\n..leading"))
        self.assertTrue(self.client.esmtp)
        self.successResultOf(self.run_(self.client.quit()))
        self.assertEqual(server.commands[-1], b"QUIT")

    def test_perRecipientResults(self) -> None:
        """2xx, 4xx and 5xx per recipient; only accepted ones get the data."""
        server = FakeSMTPServer(rcpt={"bad@r.test": b"550 5.1.1 No such user", "later@r.test": b"451 4.7.1 Greylisted"})
        results = self.successResultOf(self.session(server, rcpts=("bad@r.test", "ok@r.test", "later@r.test")))
        self.assertEqual(results["bad@r.test"].code, 550)
        self.assertEqual(results["later@r.test"], Reply(451, "4.7.1", "Greylisted"))
        self.assertEqual(results["ok@r.test"].code, 250)
        self.assertEqual(server.messages[0][1], [b"ok@r.test"])

    def test_allRecipientsRefused(self) -> None:
        """No accepted recipient: no message is sent, each gets its RCPT reply."""
        server = FakeSMTPServer(rcpt={"a@r.test": b"550 5.1.1 No", "b@r.test": b"550 5.1.1 No"})
        results = self.successResultOf(self.session(server))
        self.assertEqual({r.code for r in results.values()}, {550})
        self.assertEqual(server.messages, [])

    def test_withoutPipelining(self) -> None:
        """Without PIPELINING each command waits for its reply; no SIZE/BODY unless offered."""
        server = FakeSMTPServer(extensions=())
        results = self.successResultOf(self.session(server))
        self.assertEqual({r.code for r in results.values()}, {250})
        self.assertEqual(server.commands[1], b"MAIL FROM:<s@here.test>")
        self.assertEqual(len(server.messages), 1)

    def test_heloFallback(self) -> None:
        """A server that refuses EHLO gets HELO."""
        server = FakeSMTPServer(ehlo=b"502 5.5.2 Command not recognized")
        results = self.successResultOf(self.session(server))
        self.assertEqual(server.commands[:2], [b"EHLO me.test", b"HELO me.test"])
        self.assertFalse(self.client.esmtp)
        self.assertEqual({r.code for r in results.values()}, {250})

    def test_badGreeting(self) -> None:
        """A 554 greeting is a host failure at stage greeting."""
        c = self.connect(FakeSMTPServer(greeting=b"554 5.7.1 Go away"))
        f = self.failureResultOf(self.run_(c.handshake()), HostFailure)
        self.assertEqual((f.value.stage, f.value.reply.code), ("greeting", 554))

    def test_mailRefused(self) -> None:
        """A refused MAIL FROM fails the transaction as a whole."""
        server = FakeSMTPServer(mail=b"550 5.7.1 Sender rejected")
        f = self.failureResultOf(self.session(server), HostFailure)
        self.assertEqual((f.value.stage, f.value.reply.enhanced), ("mail", "5.7.1"))
        self.assertEqual(server.messages, [])

    def test_sizeLimit(self) -> None:
        """A message bigger than the server's SIZE is not sent: 552 5.3.4 for everyone."""
        server = FakeSMTPServer(extensions=(b"SIZE 10",))
        results = self.successResultOf(self.session(server))
        self.assertEqual({(r.code, r.enhanced) for r in results.values()}, {(552, "5.3.4")})
        self.assertNotIn(b"MAIL", b" ".join(server.commands))

    def test_dataRefused(self) -> None:
        """A refused DATA answers every accepted recipient."""
        server = FakeSMTPServer(data=b"451 4.3.0 Try later")
        results = self.successResultOf(self.session(server))
        self.assertEqual({(r.code, r.enhanced) for r in results.values()}, {(451, "4.3.0")})

    def test_finalReplyRefused(self) -> None:
        """A 5xx after the final dot fails every accepted recipient."""
        server = FakeSMTPServer(final=b"554 5.7.1 Spam")
        results = self.successResultOf(self.session(server))
        self.assertEqual({r.code for r in results.values()}, {554})

    def test_starttls(self) -> None:
        """STARTTLS is used when offered; EHLO is repeated; the mail goes over TLS."""
        server = FakeSMTPServer(starttls=FakeTLS())
        results = self.successResultOf(self.session(server, tls=lambda: FakeTLS()))
        self.assertEqual(server.commands[:3], [b"EHLO me.test", b"STARTTLS", b"EHLO me.test"])
        self.assertTrue(server.tls)
        self.assertTrue(self.client.secure)
        self.assertEqual({r.code for r in results.values()}, {250})

    def test_starttlsHandshakeFails(self) -> None:
        """A failed TLS handshake is a host failure at stage tls."""
        server = FakeSMTPServer(starttls=FakeTLS(ok=False))
        c = self.connect(server, tls=lambda: FakeTLS())
        f = self.failureResultOf(self.run_(c.handshake()), HostFailure)
        self.assertEqual(f.value.stage, "tls")
        self.assertEqual(f.value.reply.enhanced, "4.7.5")

    def test_tlsRequiredNotOffered(self) -> None:
        """require_tls without STARTTLS offered: host failure, nothing sent."""
        c = self.connect(FakeSMTPServer(), tls=lambda: FakeTLS(), require_tls=True)
        f = self.failureResultOf(self.run_(c.handshake()), HostFailure)
        self.assertEqual(f.value.stage, "starttls")

    def test_noStarttlsWithoutContext(self) -> None:
        """With tls=None STARTTLS is not attempted."""
        server = FakeSMTPServer(starttls=FakeTLS())
        self.successResultOf(self.session(server))
        self.assertNotIn(b"STARTTLS", server.commands)

    def test_authPlain(self) -> None:
        """AUTH PLAIN with the credentials after TLS."""
        server = FakeSMTPServer(starttls=FakeTLS(), auth=("u", "pw"))
        self.successResultOf(self.session(server, tls=lambda: FakeTLS(), require_tls=True, credentials=("u", "pw")))
        self.assertTrue(server.commands[3].startswith(b"AUTH PLAIN "))
        self.assertEqual(len(server.messages), 1)

    def test_authFails(self) -> None:
        """A refused AUTH is a host failure at stage auth."""
        server = FakeSMTPServer(starttls=FakeTLS(), auth=("u", "pw"))
        c = self.connect(server, tls=lambda: FakeTLS(), credentials=("u", "wrong"))
        f = self.failureResultOf(self.run_(c.handshake()), HostFailure)
        self.assertEqual((f.value.stage, f.value.reply.code), ("auth", 535))

    def test_commandTimeout(self) -> None:
        """No reply within the command timeout aborts: a temporary host failure."""
        server = FakeSMTPServer(hang_at=b"MAIL")
        c = self.connect(server, )
        self.successResultOf(self.run_(c.handshake()))
        d = self.run_(c.send("s@here.test", ["a@r.test"], MemorySource(MESSAGE), len(MESSAGE)))
        self.assertNoResult(d)
        self.clock.advance(30)
        drive(self.pumps, self.clock, d)
        f = self.failureResultOf(d, HostFailure)
        self.assertEqual(f.value.reply, TIMEOUT)

    def test_greetingTimeout(self) -> None:
        """A server that never greets times out too."""
        c = self.connect(FakeSMTPServer(greeting=b""))
        # an empty line is no reply; the client must not wait forever
        d = self.run_(c.handshake())
        if not d.called:
            self.clock.advance(30)
            drive(self.pumps, self.clock, d)
        self.failureResultOf(d, HostFailure)

    def test_droppedAfterDot(self) -> None:
        """A connection lost while waiting for the final reply fails at stage dot."""
        server = FakeSMTPServer(drop_at=b".")
        f = self.failureResultOf(self.session(server), HostFailure)
        self.assertEqual(f.value.stage, "dot")

    def test_droppedAtRcpt(self) -> None:
        """A connection lost during RCPT fails the transaction before data."""
        server = FakeSMTPServer(drop_at=b"RCPT", extensions=())
        f = self.failureResultOf(self.session(server), HostFailure)
        self.assertEqual(f.value.stage, "rcpt")

    def test_bigMessageStreams(self) -> None:
        """A big body arrives intact (line endings normalised, dots stuffed)."""
        body = b"".join(b".line %d with some text\n" % i for i in range(15000))
        message = b"Subject: big\r\n\r\n" + body
        server = FakeSMTPServer()
        self.successResultOf(self.session(server, message=message))
        expected = DataEncoder().encode(message)[:-3]
        self.assertEqual(server.messages[0][2], expected)

    def test_nullSender(self) -> None:
        """A DSN goes out with MAIL FROM:<>."""
        server = FakeSMTPServer(extensions=())
        c = self.connect(server)
        self.successResultOf(self.run_(c.handshake()))
        self.successResultOf(self.run_(c.send("", ["a@r.test"], MemorySource(MESSAGE), len(MESSAGE))))
        self.assertEqual(server.commands[1], b"MAIL FROM:<>")

    def test_utf8Addresses(self) -> None:
        """UTF-8 addresses need SMTPUTF8 (RFC 6531): sent with the parameter, else 553 5.6.7."""
        results = self.successResultOf(self.session(FakeSMTPServer(), rcpts=("jos\u00e9@r.test",)))
        self.assertEqual({(r.code, r.enhanced) for r in results.values()}, {(553, "5.6.7")})
        server = FakeSMTPServer(extensions=(b"SMTPUTF8",))
        results = self.successResultOf(self.session(server, rcpts=("jos\u00e9@r.test",)))
        self.assertEqual({r.code for r in results.values()}, {250})
        self.assertEqual(server.commands[1], b"MAIL FROM:<s@here.test> SMTPUTF8")


class OverlapTests(SynchronousTestCase):
    """Transactions on one connection, the next one sent behind the previous one's data."""

    def client(self, extensions: bytes) -> tuple[SMTPClientProtocol, StringTransport]:
        c = SMTPClientProtocol("me.test", Clock(), 30.0)
        t = StringTransport()
        c.makeConnection(t)
        d = c.handshake()
        c.dataReceived(b"220 sink.test\r\n")
        c.dataReceived(b"250-sink.test\r\n" + extensions + b"250 8BITMIME\r\n")
        self.successResultOf(d)
        t.clear()
        return c, t

    def test_nextTransactionRidesBehindData(self) -> None:
        """With PIPELINING the second MAIL/RCPT/DATA go out right after the first
        message's "." (RFC 2920 3.1), before its final reply; replies pair in order."""
        c, t = self.client(b"250-PIPELINING\r\n")
        first = c.send("s@here.test", ["a@r.test"], MemorySource(b"one\r\n"), 5)
        second = c.send("s@here.test", ["b@r.test"], MemorySource(b"two\r\n"), 5)
        self.assertEqual(t.value(), b"MAIL FROM:<s@here.test> BODY=8BITMIME\r\nRCPT TO:<a@r.test>\r\nDATA\r\n")
        self.assertEqual(c.pending, 2)
        t.clear()
        c.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(
            t.value(),
            b"one\r\n.\r\nMAIL FROM:<s@here.test> BODY=8BITMIME\r\nRCPT TO:<b@r.test>\r\nDATA\r\n",
        )
        t.clear()
        c.dataReceived(b"250 2.0.0 first queued\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(self.successResultOf(first)["a@r.test"].text, "first queued")
        self.assertEqual(t.value(), b"two\r\n.\r\n")
        c.dataReceived(b"250 2.0.0 second queued\r\n")
        self.assertEqual(self.successResultOf(second)["b@r.test"].text, "second queued")
        self.assertEqual((c.pending, c.transactions), (0, 2))

    def test_pipelinedGroupIsOneWrite(self) -> None:
        """MAIL, every RCPT and DATA leave in one transport write; a connection lost
        in the middle of their replies fails the transaction at the first unanswered one."""
        c, t = self.client(b"250-PIPELINING\r\n")
        writes: list[bytes] = []
        real = t.write
        t.write = lambda data: (writes.append(data), real(data))[1]  # type: ignore[method-assign]
        d = c.send("s@here.test", ["a@r.test", "b@r.test"], MemorySource(b"x\r\n"), 3)
        self.assertEqual(
            writes, [b"MAIL FROM:<s@here.test> BODY=8BITMIME\r\nRCPT TO:<a@r.test>\r\nRCPT TO:<b@r.test>\r\nDATA\r\n"]
        )
        c.dataReceived(b"250 ok\r\n250 ok\r\n")
        self.assertNoResult(d)
        c.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual(failure.value.stage, "rcpt")

    def test_withoutPipeliningWaits(self) -> None:
        """Without PIPELINING the second transaction starts after the first has finished."""
        c, t = self.client(b"")
        first = c.send("s@here.test", ["a@r.test"], MemorySource(b"one\r\n"), 5)
        second = c.send("s@here.test", ["b@r.test"], MemorySource(b"two\r\n"), 5)
        for reply in (b"250 ok", b"250 ok", b"354 go"):
            c.dataReceived(reply + b"\r\n")
        self.assertTrue(t.value().endswith(b"one\r\n.\r\n"))
        c.dataReceived(b"250 queued\r\n")
        self.successResultOf(first)
        self.assertTrue(t.value().endswith(b"MAIL FROM:<s@here.test> BODY=8BITMIME\r\n"))
        self.assertNoResult(second)

    def test_quitWaitsForTransactions(self) -> None:
        """quit() during a transaction says QUIT only after it, never inside the data;
        the connection is no longer offered for reuse meanwhile."""
        c, t = self.client(b"250-PIPELINING\r\n")
        first = c.send("s@here.test", ["a@r.test"], MemorySource(b"one\r\n"), 5)
        c.quit()
        self.assertFalse(c.alive)
        c.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertNotIn(b"QUIT", t.value())
        c.dataReceived(b"250 queued\r\n")
        self.successResultOf(first)
        self.assertTrue(t.value().endswith(b".\r\nQUIT\r\n"))

    def test_lostConnectionFailsTheRider(self) -> None:
        """A connection lost after the first message's data fails it at "dot" and the
        transaction behind it at "mail" (nothing of it was accepted)."""
        c, _ = self.client(b"250-PIPELINING\r\n")
        first = c.send("s@here.test", ["a@r.test"], MemorySource(b"one\r\n"), 5)
        second = c.send("s@here.test", ["b@r.test"], MemorySource(b"two\r\n"), 5)
        c.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        c.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failureResultOf(first, HostFailure).value.stage, "dot")
        self.assertEqual(self.failureResultOf(second, HostFailure).value.stage, "mail")
        self.assertFalse(c.alive)

    def test_oneTimerAcrossTransactions(self) -> None:
        """Message after message on one connection keeps one reply timer (moved, not
        re-created); once every reply has come it runs out without closing anything."""
        c, t = self.client(b"250-PIPELINING\r\n")
        made = []
        call_later = c.clock.callLater
        c.clock.callLater = lambda *a, **kw: made.append(a[0]) or call_later(*a, **kw)  # type: ignore[method-assign]
        for rcpt in ("a@r.test", "b@r.test"):
            d = c.send("s@here.test", [rcpt], MemorySource(b"one\r\n"), 5)
            c.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n")
            self.successResultOf(d)
        self.assertLessEqual(len(made), 1)
        c.clock.advance(61)
        self.assertTrue(c.alive)
        self.assertFalse(t.disconnecting)

    def test_messageInMemoryInOneWrite(self) -> None:
        """A message held in memory goes out, dot-stuffed and terminated, in one write
        after the 354, the same bytes as a file source streams chunk by chunk."""
        body = b"a" * (CHUNK + 10) + b"\r\n.dot\r\nend"
        wire = []
        for source in (MemorySource(body), FileSource(io.BytesIO(body), lambda f, *a: succeed(f(*a)))):
            c = SMTPClientProtocol("me.test", Clock(), 30.0)
            t = WriteLog()
            c.makeConnection(t)
            c.handshake()
            c.dataReceived(b"220 sink.test\r\n250-sink.test\r\n250 PIPELINING\r\n")
            d = c.send("s@here.test", ["a@r.test"], source, len(body))
            c.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
            wire.append(t.writes[2:])  # after EHLO and the MAIL/RCPT/DATA group
            c.dataReceived(b"250 queued\r\n")
            self.assertEqual(self.successResultOf(d)["a@r.test"].code, 250)
        memory, chunked = wire
        self.assertEqual(len(memory), 1)
        self.assertGreater(len(chunked), 1)
        self.assertEqual(memory[0], b"".join(chunked))
        self.assertTrue(memory[0].endswith(b"\r\n..dot\r\nend\r\n.\r\n"))

    def test_repeatedRepliesParsedOnce(self) -> None:
        """A one-line reply the server repeats is parsed once and shared (Reply is
        immutable); its enhanced code and text are as make_reply gives them."""
        c, _ = self.client(b"250-PIPELINING\r\n")
        results = []
        for rcpt in ("a@r.test", "b@r.test"):
            d = c.send("s@here.test", [rcpt], MemorySource(b"one\r\n"), 5)
            c.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 Ok: queued\r\n")
            results.append(self.successResultOf(d)[rcpt])
        self.assertIs(results[0], results[1])
        self.assertEqual(results[0], make_reply(250, ["2.0.0 Ok: queued"]))


class SourceTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """MemorySource and FileSource provide IMessageSource."""
        verifyObject(IMessageSource, MemorySource(b"x"))
        verifyObject(IMessageSource, FileSource(io.BytesIO(b"x"), lambda f, *a: succeed(f(*a))))

    def test_whole(self) -> None:
        """A MemorySource offers its bytes whole until closed; a FileSource never does."""
        source = MemorySource(b"x")
        self.assertEqual(source.whole, b"x")
        source.close()
        self.assertIsNone(source.whole)
        self.assertIsNone(FileSource(io.BytesIO(b"x"), lambda f, *a: succeed(f(*a))).whole)

    def test_producerWaitsForThreadReads(self) -> None:
        """The body producer writes nothing until a read in the thread pool has
        returned, keeps one read outstanding, and ends with CRLF.CRLF."""
        pending: list[tuple] = []

        def threads(f, *a):
            d: Deferred = Deferred()
            pending.append((f, a, d))
            return d

        def run_one() -> None:
            f, a, d = pending.pop(0)
            d.callback(f(*a))

        transport = StringTransport()
        body = b"a" * (CHUNK + 10) + b"\r\n.dot\r\n"
        producer = BodyProducer(FileSource(io.BytesIO(body), threads), transport, lambda: None)
        producer.start()
        self.assertEqual((transport.value(), len(pending)), (b"", 1))
        run_one()
        self.assertEqual((len(transport.value()), len(pending)), (CHUNK, 1))
        run_one()
        run_one()  # the empty read: the end
        self.assertEqual(pending, [])
        self.assertEqual(transport.value(), b"a" * (CHUNK + 10) + b"\r\n..dot\r\n.\r\n")
        self.successResultOf(producer.done)


class LogEscapeTests(SynchronousTestCase):
    def test_peerNameEscapedInLogs(self) -> None:
        """An MX name with control characters (from the DNS) reaches the log escaped (logsafe)."""
        from twisted.logger import globalLogPublisher

        seen: list = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        clock = Clock()
        c = SMTPClientProtocol("me.test", clock, 30.0, peer_name="evil\x1b[2J\nFAKE LINE[192.0.2.1]")
        c.makeConnection(StringTransport())
        d = c.handshake()
        clock.advance(31)  # the timeout logs the peer and aborts
        c.connectionLost(Failure(ConnectionAborted()))
        self.failureResultOf(d)
        names = [e["mx"] for e in seen if "mx" in e]
        self.assertTrue(names)
        self.assertFalse(any("\x1b" in n or "\n" in n for n in names))
        self.assertIn("\\x1b", names[0])
