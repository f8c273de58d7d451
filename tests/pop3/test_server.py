"""pop3.server: every command and state rule, over StringTransport with a Clock."""

from __future__ import annotations

import base64
import os
import re

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailstack import session
from mailstack.net import is_loopback
from mailstack.pop3 import mailbox, server, streamer
from mailstack.pop3 import replies as R
from mailstack.pop3.factory import make_factory
from mailstack.pop3.server import AUTHORIZATION, TRANSACTION
from tests.support.transports import ImplicitTLSTransport, TLSStringTransport

from .support import make_runtime, message_files, message_path, temp_dir, write_message


def plain(authz: bytes, user: bytes, pw: bytes) -> bytes:
    return base64.b64encode(authz + b"\0" + user + b"\0" + pw)


class Base(SynchronousTestCase):
    kind = "pop3"
    host = "192.0.2.7"
    tls = True  # start sessions with STLS done (plaintext login refused otherwise)

    def setUp(self) -> None:
        self.root = temp_dir(self)
        self.overrides: dict[str, object] = {}
        self.rt = make_runtime(self.root, **self.overrides)
        self.clock = self.rt.reactor
        self.maildir = os.path.join(self.root, "mail", "localhost", "alice")
        self.sessions: list[server.POP3Server] = []

    def connect(self, tls: bool | None = None, host: str | None = None, transport: object = None) -> server.POP3Server:
        tls = self.tls if tls is None else tls
        factory = getattr(self, "factory", None) or make_factory(self.kind, self.rt)
        self.factory = factory
        proto = factory.buildProtocol(None)
        t = transport or (ImplicitTLSTransport if self.kind == "pop3s" else TLSStringTransport)(host or self.host)
        proto.makeConnection(t)
        self.sessions.append(proto)
        self.addCleanup(self.drop, proto)
        if tls and self.kind == "pop3":
            self.assertEqual(self.talk(proto, b"STLS"), R.STLS_BEGIN)
        t.clear()
        t.writes.clear()
        return proto

    def drop(self, proto: server.POP3Server) -> None:
        if not proto._lost:
            proto.connectionLost()

    def talk(self, proto: server.POP3Server, *lines: bytes) -> bytes:
        t = proto.transport
        t.clear()
        proto.dataReceived(b"".join(line + b"\r\n" for line in lines))
        return t.value()

    def login(self, proto: server.POP3Server, user: bytes = b"alice@localhost", pw: bytes = b"secret") -> bytes:
        return self.talk(proto, b"USER " + user, b"PASS " + pw)

    def session(self) -> server.POP3Server:
        proto = self.connect()
        self.assertTrue(
            self.login(proto).endswith(b"+OK Logged in, %d messages (%d octets)\r\n" % (proto._count, proto._octets))
        )
        self.assertEqual(proto.state, TRANSACTION)
        return proto


class GreetingAndCapaTests(Base):
    def test_greeting(self) -> None:
        """The server greets with +OK mailstack POP3 ready."""
        proto = make_factory("pop3", self.rt).buildProtocol(None)
        t = TLSStringTransport()
        proto.makeConnection(t)
        self.assertEqual(t.value(), b"+OK mailstack POP3 ready\r\n")
        self.assertTrue(t.nodelay)
        proto.connectionLost()

    def capa(self, proto: server.POP3Server) -> list[bytes]:
        out = self.talk(proto, b"CAPA").split(b"\r\n")
        self.assertEqual(out[0], b"+OK Capability list follows")
        self.assertEqual(out[-2:], [b".", b""])
        return out[1:-2]

    def test_capaBeforeTLS(self) -> None:
        """Before STLS: STLS offered, USER and SASL hidden (no plaintext passwords)."""
        caps = self.capa(self.connect(tls=False))
        self.assertEqual(
            caps,
            [
                b"TOP",
                b"UIDL",
                b"STLS",
                b"RESP-CODES",
                b"AUTH-RESP-CODE",
                b"PIPELINING",
                b"EXPIRE NEVER",
                b"IMPLEMENTATION mailstack",
                b"UTF8 USER",
            ],
        )

    def test_capaAfterTLS(self) -> None:
        """After STLS: USER and SASL PLAIN, no STLS."""
        caps = self.capa(self.connect())
        self.assertEqual(
            caps,
            [
                b"TOP",
                b"UIDL",
                b"USER",
                b"SASL PLAIN",
                b"RESP-CODES",
                b"AUTH-RESP-CODE",
                b"PIPELINING",
                b"EXPIRE NEVER",
                b"IMPLEMENTATION mailstack",
                b"UTF8 USER",
            ],
        )

    def test_capaLoopbackAllowed(self) -> None:
        """On loopback with auth.plaintext_on_loopback everything is offered at once."""
        self.rt = make_runtime(self.root, auth__plaintext_on_loopback=True)
        caps = self.capa(self.connect(tls=False, host="127.0.0.1"))
        for c in (b"USER", b"SASL PLAIN", b"STLS"):
            self.assertIn(c, caps)

    def test_capaInTransaction(self) -> None:
        """CAPA works in TRANSACTION and omits the login capabilities."""
        caps = self.capa(self.session())
        self.assertNotIn(b"USER", caps)
        self.assertIn(b"UIDL", caps)

    def test_pop3sNoSTLS(self) -> None:
        """On pop3s the session is TLS from the start: USER offered, STLS not."""
        self.kind = "pop3s"
        proto = self.connect()
        caps = self.capa(proto)
        self.assertIn(b"USER", caps)
        self.assertNotIn(b"STLS", caps)
        self.assertEqual(self.talk(proto, b"STLS"), R.STLS_ALREADY)
        self.assertTrue(self.login(proto).startswith(R.USER_OK + b"+OK Logged in"))

    def test_tooManyConnections(self) -> None:
        """Beyond pop3.max_connections a client gets -ERR [SYS/TEMP] and is closed."""
        self.rt = make_runtime(self.root, pop3__max_connections=1)
        self.connect()
        proto = self.factory.buildProtocol(None)
        t = TLSStringTransport()
        proto.makeConnection(t)
        self.assertEqual(t.value(), R.TOO_MANY_CONNECTIONS)
        self.assertTrue(t.disconnecting)
        proto.connectionLost()
        self.sessions[0].connectionLost()
        t2 = TLSStringTransport()
        p2 = self.factory.buildProtocol(None)
        p2.makeConnection(t2)
        self.assertEqual(t2.value(), R.GREETING)
        p2.connectionLost()

    def test_perIpCap(self) -> None:
        """Beyond pop3.max_connections_per_ip from one address: -ERR [SYS/TEMP] and close;
        another address is still served."""
        self.rt = make_runtime(self.root, pop3__max_connections_per_ip=2)
        self.connect(host="192.0.2.1")
        self.connect(host="192.0.2.1")
        proto = self.factory.buildProtocol(None)
        t = TLSStringTransport("192.0.2.1")
        proto.makeConnection(t)
        self.assertEqual(t.value(), R.TOO_MANY_CONNECTIONS_IP)
        self.assertTrue(t.disconnecting)
        proto.connectionLost()
        other = self.connect(host="192.0.2.2", tls=False)
        self.assertFalse(other.transport.disconnecting)

    def test_limitCoversBothListeners(self) -> None:
        """pop3.max_connections counts pop3 and pop3s sessions together."""
        self.rt = make_runtime(self.root, pop3__max_connections=1)
        self.connect(tls=False)
        proto = make_factory("pop3s", self.rt).buildProtocol(None)
        t = ImplicitTLSTransport()
        proto.makeConnection(t)
        self.assertEqual(t.value(), R.TOO_MANY_CONNECTIONS)
        proto.connectionLost()

    def test_badKind(self) -> None:
        """make_factory knows only pop3 and pop3s."""
        self.assertRaises(ValueError, make_factory, "imap", self.rt)


class TLSPolicyTests(Base):
    tls = False

    def test_userRefusedBeforeTLS(self) -> None:
        """USER, PASS and AUTH before STLS get -ERR [AUTH] (RFC 3206: policy)."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"USER alice@localhost"), R.TLS_REQUIRED)
        self.assertEqual(self.talk(proto, b"PASS secret"), R.TLS_REQUIRED)
        self.assertEqual(self.talk(proto, b"AUTH PLAIN " + plain(b"", b"alice@localhost", b"secret")), R.TLS_REQUIRED)
        self.assertTrue(R.TLS_REQUIRED.startswith(b"-ERR [AUTH] "))
        self.assertEqual(self.rt.checker.calls, [])

    def test_loopbackNeedsConfig(self) -> None:
        """Loopback alone does not allow plaintext logins."""
        proto = self.connect(host="127.0.0.1")
        self.assertEqual(self.talk(proto, b"USER alice@localhost"), R.TLS_REQUIRED)

    def test_loopbackAllowedByConfig(self) -> None:
        """auth.plaintext_on_loopback allows login without TLS from 127.0.0.1 and ::1 only."""
        self.rt = make_runtime(self.root, auth__plaintext_on_loopback=True)
        proto = self.connect(host="127.0.0.1")
        self.assertIn(b"+OK Logged in", self.login(proto))
        proto2 = self.connect(host="192.0.2.1")
        self.assertEqual(self.talk(proto2, b"USER alice@localhost"), R.TLS_REQUIRED)
        self.assertTrue(is_loopback("::1"))
        self.assertTrue(is_loopback("::ffff:127.0.0.1"))
        self.assertFalse(is_loopback("10.0.0.1"))

    def test_stls(self) -> None:
        """STLS answers +OK in the clear, then starts TLS with the runtime's context."""
        proto = self.connect()
        t = proto.transport
        self.assertEqual(self.talk(proto, b"STLS"), R.STLS_BEGIN)
        self.assertIs(t.tls_context, self.rt.tls.context)
        self.assertTrue(ISSLTransport.providedBy(t))
        self.assertEqual(self.talk(proto, b"STLS"), R.STLS_ALREADY)

    def test_stlsDiscardsPipelinedInput(self) -> None:
        """Commands pipelined after STLS in the clear are discarded (RFC 2595, CVE-2011-0411 class)."""
        proto = self.connect()
        out = self.talk(proto, b"STLS", b"USER alice@localhost", b"PASS secret")
        self.assertEqual(out, R.STLS_BEGIN)
        self.assertEqual(self.talk(proto, b"PASS secret"), R.USER_FIRST)
        self.assertEqual(proto.state, AUTHORIZATION)

    def test_stlsForgetsUser(self) -> None:
        """USER given before STLS is forgotten (RFC 2595 section 4)."""
        self.rt = make_runtime(self.root, auth__plaintext_on_loopback=True)
        proto = self.connect(host="127.0.0.1")
        self.assertEqual(self.talk(proto, b"USER alice@localhost"), R.USER_OK)
        self.talk(proto, b"STLS")
        self.assertEqual(self.talk(proto, b"PASS secret"), R.USER_FIRST)

    def test_stlsInTransaction(self) -> None:
        """STLS after login is refused."""
        self.rt = make_runtime(self.root, auth__plaintext_on_loopback=True)
        proto = self.connect(host="127.0.0.1")
        self.login(proto)
        self.assertEqual(self.talk(proto, b"STLS"), R.BAD_STATE)


class LoginTests(Base):
    def test_userPass(self) -> None:
        """USER then PASS logs in, locks the maildrop and reports its size."""
        write_message(self.maildir, b"hello\n")
        proto = self.connect()
        self.assertEqual(self.login(proto), R.USER_OK + b"+OK Logged in, 1 messages (7 octets)\r\n")
        self.assertEqual(proto.state, TRANSACTION)
        self.assertEqual(self.rt.checker.calls, [(b"alice@localhost", b"secret")])
        self.assertEqual(self.rt.throttle.successes, [(self.host, "alice@localhost")])

    def test_passWithSpaces(self) -> None:
        """The password is the rest of the line, spaces included."""
        self.rt.checker.users[b"bob@localhost"] = b"two words "
        proto = self.connect()
        self.assertIn(b"+OK Logged in", self.login(proto, b"bob@localhost", b"two words "))

    def test_passWithoutUser(self) -> None:
        """PASS needs a USER right before it."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"PASS secret"), R.USER_FIRST)
        self.assertEqual(
            self.talk(proto, b"USER alice@localhost", b"NOOP", b"PASS secret"), R.USER_OK + R.BAD_STATE + R.USER_FIRST
        )

    def test_userWithoutName(self) -> None:
        """USER with no argument is refused."""
        self.assertEqual(self.talk(self.connect(), b"USER"), R.USER_BAD)

    def test_badPasswordSlowed(self) -> None:
        """A failed login is answered after the throttle's delay; pipelined commands wait."""
        self.rt.throttle.delay = 4.0
        proto = self.connect()
        out = self.talk(proto, b"USER alice@localhost", b"PASS wrong", b"CAPA")
        self.assertEqual(out, R.USER_OK)
        self.assertEqual(self.rt.throttle.failures, [(self.host, "alice@localhost")])
        proto.transport.clear()
        self.clock.advance(3.9)
        self.assertEqual(proto.transport.value(), b"")
        self.clock.advance(0.1)
        self.assertTrue(proto.transport.value().startswith(R.LOGIN_FAILED + R.CAPA_HEADER))
        self.assertEqual(proto.state, AUTHORIZATION)
        self.assertIn(b"+OK Logged in", self.login(proto))

    def test_failureLoggedWithoutPassword(self) -> None:
        """Failed logins are logged with peer and user, never the password."""
        proto = self.connect()
        with capturedLogs() as events:
            self.assertEqual(self.login(proto, pw=b"s3cr3t-wrong"), R.USER_OK + R.LOGIN_FAILED)
        failed = [e for e in events if "failed" in e.get("log_format", "")]
        self.assertEqual(len(failed), 1)
        self.assertEqual((failed[0]["peer"], failed[0]["user"]), (self.host, "alice@localhost"))
        self.assertNotIn("s3cr3t", repr(events))

    def test_failureCountedAfterHangup(self) -> None:
        """A client hanging up while its password is checked still gets the failure counted."""
        d: defer.Deferred[str] = defer.Deferred()
        self.rt.checker.requestAvatarId = lambda creds: d
        proto = self.connect()
        self.login(proto, pw=b"guess")
        proto.connectionLost()
        d.errback(UnauthorizedLogin())
        self.assertEqual(self.rt.throttle.failures, [(self.host, "alice@localhost")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lockedOut(self) -> None:
        """A locked-out peer or account is refused without checking the password."""
        self.rt.throttle.locked_out.add(self.host)
        proto = self.connect()
        self.assertEqual(self.login(proto), R.USER_OK + R.LOCKED_OUT)
        self.assertEqual(self.rt.checker.calls, [])
        self.assertTrue(R.LOCKED_OUT.startswith(b"-ERR [AUTH]"))

    def test_checkerBroken(self) -> None:
        """A checker failure that is not UnauthorizedLogin gives -ERR [SYS/TEMP]."""
        self.rt.checker.error = RuntimeError("db down")
        proto = self.connect()
        self.assertEqual(self.login(proto), R.USER_OK + R.AUTH_SERVICE_FAILED)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.rt.throttle.failures, [])

    def test_authPlainInitialResponse(self) -> None:
        """AUTH PLAIN with an initial response (RFC 5034 section 4)."""
        proto = self.connect()
        out = self.talk(proto, b"AUTH PLAIN " + plain(b"", b"alice@localhost", b"secret"))
        self.assertEqual(out, b"+OK Logged in, 0 messages (0 octets)\r\n")

    def test_authPlainContinuation(self) -> None:
        """AUTH PLAIN without initial response gets '+ ' and reads the next line."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"AUTH PLAIN"), b"+ \r\n")
        self.assertEqual(
            self.talk(proto, plain(b"alice@localhost", b"alice@localhost", b"secret")),
            b"+OK Logged in, 0 messages (0 octets)\r\n",
        )

    def test_authPlainCancel(self) -> None:
        """'*' cancels an AUTH exchange with -ERR."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"AUTH PLAIN", b"*", b"NOOP"), b"+ \r\n" + R.AUTH_CANCELLED + R.BAD_STATE)

    def test_authPlainBadBase64(self) -> None:
        """Undecodable base64 fails the AUTH command."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"AUTH PLAIN !!!"), R.AUTH_BAD_BASE64)
        self.assertEqual(self.talk(proto, b"AUTH PLAIN", b"@@"), b"+ \r\n" + R.AUTH_BAD_BASE64)

    def test_authPlainMalformed(self) -> None:
        """A PLAIN message without two NULs, or an empty initial response, is refused."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"AUTH PLAIN " + base64.b64encode(b"alice")), R.AUTH_MALFORMED)
        self.assertEqual(self.talk(proto, b"AUTH PLAIN ="), R.AUTH_MALFORMED)

    def test_authPlainOtherAuthzid(self) -> None:
        """Authorizing as another user fails like a bad password."""
        proto = self.connect()
        out = self.talk(proto, b"AUTH PLAIN " + plain(b"bob@localhost", b"alice@localhost", b"secret"))
        self.assertEqual(out, R.LOGIN_FAILED)
        self.assertEqual(self.rt.checker.calls, [])
        self.assertEqual(self.rt.throttle.failures, [(self.host, "alice@localhost")])

    def test_authPlainWrongPassword(self) -> None:
        """AUTH PLAIN with a wrong password: -ERR [AUTH], slowed by the throttle."""
        self.rt.throttle.delay = 1.0
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"AUTH PLAIN " + plain(b"", b"alice@localhost", b"nope")), b"")
        self.clock.advance(1)
        self.assertEqual(proto.transport.value(), R.LOGIN_FAILED)

    def test_authMechanisms(self) -> None:
        """AUTH alone lists the mechanisms; an unknown one is refused."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"AUTH"), b"".join(R.AUTH_MECHANISMS))
        self.assertEqual(self.talk(proto, b"AUTH CRAM-MD5"), R.AUTH_BAD_MECHANISM)

    def test_inUse(self) -> None:
        """A second session on the same mailbox gets -ERR [IN-USE]; after QUIT it works."""
        first = self.session()
        second = self.connect()
        self.assertEqual(self.login(second), R.USER_OK + R.IN_USE)
        self.assertEqual(second.state, AUTHORIZATION)
        self.talk(first, b"QUIT")
        self.assertIn(b"+OK Logged in", self.login(second))

    def test_inUseReleasedOnDrop(self) -> None:
        """A dropped session releases the lock."""
        first = self.session()
        first.connectionLost()
        self.assertIn(b"+OK Logged in", self.login(self.connect()))

    def test_otherUserNotBlocked(self) -> None:
        """The lock is per mailbox: another user logs in meanwhile."""
        self.session()
        self.assertIn(b"+OK Logged in", self.login(self.connect(), b"bob@localhost", b"hunter2"))

    def test_maildropError(self) -> None:
        """A disk error while opening the maildrop gives -ERR [SYS/TEMP]."""

        def broken(path: str) -> list[str]:
            raise OSError(5, "I/O error")

        self.patch(mailbox, "_listdir", broken)
        proto = self.connect()
        self.assertEqual(self.login(proto), R.USER_OK + R.MAILDROP_UNAVAILABLE)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_unusableMailboxName(self) -> None:
        """A user key that cannot name a mailbox gets -ERR [SYS/PERM]."""
        self.rt.checker.users[b'"a b"@localhost'] = b"pw"
        proto = self.connect()
        self.assertEqual(self.login(proto, b'"a b"@localhost', b"pw"), R.USER_OK + R.MAILDROP_INVALID)

    def test_dropDuringLogin(self) -> None:
        """A client that leaves while its password is being checked leaves no lock behind."""
        d: defer.Deferred[str] = defer.Deferred()
        self.rt.checker.requestAvatarId = lambda creds: d
        proto = self.connect()
        self.login(proto)
        proto.connectionLost()
        d.callback("alice@localhost")
        self.rt.checker = type(self.rt.checker)()
        self.factory = None
        self.assertIn(b"+OK Logged in", self.login(self.connect()))


class TransactionTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.bodies = [
            b"Subject: one\r\n\r\nfirst\r\n",
            b"Subject: two\n\n.dotted\nline2\nline3\n",
            b"Subject: three\r\n\r\nno final newline",
        ]
        self.names = [write_message(self.maildir, b, when=1700000000 + i) for i, b in enumerate(self.bodies)]
        self.sizes = [mailbox.wire_size_of([b]) for b in self.bodies]

    def test_stat(self) -> None:
        """STAT gives count and total octets."""
        proto = self.session()
        self.assertEqual(self.talk(proto, b"STAT"), b"+OK 3 %d\r\n" % sum(self.sizes))

    def test_list(self) -> None:
        """LIST lists every message with its size; LIST n one of them."""
        proto = self.session()
        expected = b"+OK 3 messages (%d octets)\r\n" % sum(self.sizes)
        expected += b"".join(b"%d %d\r\n" % (i, s) for i, s in enumerate(self.sizes, 1)) + b".\r\n"
        self.assertEqual(self.talk(proto, b"LIST"), expected)
        self.assertEqual(self.talk(proto, b"LIST 2"), b"+OK 2 %d\r\n" % self.sizes[1])

    def test_listBadArgs(self) -> None:
        """LIST with a bad or out-of-range number gets -ERR."""
        proto = self.session()
        self.assertEqual(
            self.talk(proto, b"LIST 0", b"LIST 4", b"LIST x", b"LIST -1"), R.NO_SUCH_MESSAGE * 2 + R.BAD_ARGUMENTS * 2
        )

    def test_uidl(self) -> None:
        """UIDL gives the Maildir unique names; UIDL n one of them."""
        proto = self.session()
        expected = (
            R.UIDL_HEADER + b"".join(b"%d %s\r\n" % (i, n.encode()) for i, n in enumerate(self.names, 1)) + b".\r\n"
        )
        self.assertEqual(self.talk(proto, b"UIDL"), expected)
        self.assertEqual(self.talk(proto, b"UIDL 3"), b"+OK 3 %s\r\n" % self.names[2].encode())

    def test_uidlStableAcrossSessions(self) -> None:
        """UIDLs survive a new delivery, a deletion and a flag rename between sessions."""
        proto = self.session()
        first = self.talk(proto, b"UIDL 2")
        self.talk(proto, b"DELE 1", b"QUIT")
        write_message(self.maildir, b"new\n", when=1800000000)
        name = message_path(self.maildir, self.names[1])
        self.assertTrue(name.endswith(":2,"))  # QUIT moved it to cur/
        os.rename(name, name + "S")
        proto = self.session()
        out = self.talk(proto, b"UIDL").split(b"\r\n")
        self.assertIn(first.split(b" ", 2)[2].rstrip(b"\r\n"), [line.split(b" ")[-1] for line in out])
        self.assertEqual(len(out), 6)  # header, 3 messages, ".", ""

    def unstuffed(self, reply: bytes) -> bytes:
        head, _, body = reply.partition(b"\r\n")
        self.assertTrue(body.endswith(b".\r\n"))
        lines = body[:-3].split(b"\r\n")[:-1]
        return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)

    def test_retr(self) -> None:
        """RETR sends +OK size, the message with CRLF and dot-stuffing, and '.'."""
        proto = self.session()
        for i, body in enumerate(self.bodies, 1):
            out = self.talk(proto, b"RETR %d" % i)
            self.assertEqual(out, R.retr_header(self.sizes[i - 1]) + mailbox.encode_message(body))
            self.assertEqual(len(self.unstuffed(out)), self.sizes[i - 1])
        self.assertIn(b"\r\n..dotted\r\n", self.talk(proto, b"RETR 2"))

    def test_retrReadsAhead(self) -> None:
        """After a RETR of a message already in wire form, the next message is read
        between commands (clients download in order); the next RETR sends exactly
        what it would have read itself, and DELE in between does not disturb it."""
        proto = self.session()
        self.assertEqual(self.talk(proto, b"RETR 1"), R.retr_header(self.sizes[0]) + self.bodies[0] + b".\r\n")
        self.assertEqual(proto._ahead[0], 1)
        self.talk(proto, b"DELE 1")
        self.assertEqual(proto._ahead[0], 1)
        self.assertEqual(
            self.talk(proto, b"RETR 2"), R.retr_header(self.sizes[1]) + mailbox.encode_message(self.bodies[1])
        )
        self.assertIsNone(proto._ahead)  # message 2 needed encoding: no read-ahead after it
        self.assertEqual(
            self.talk(proto, b"RETR 3"), R.retr_header(self.sizes[2]) + mailbox.encode_message(self.bodies[2])
        )
        self.assertEqual(self.talk(proto, b"RETR 1"), R.ALREADY_DELETED)

    def test_retrReadAheadReplyReady(self) -> None:
        """A message read ahead in wire form has its RETR reply made between
        commands: the next RETR sends exactly those bytes without touching the
        file, and reads ahead again; TOP of it is still answered from its content."""
        body = b"Subject: five\r\n\r\nbody\r\n"
        for i, data in enumerate((b"Subject: four\r\n\r\n", body, b"Subject: six\r\n\r\nx\r\n")):
            write_message(self.maildir, data, when=1800000000 + i)
        proto = self.session()
        self.talk(proto, b"RETR 4")
        expected = R.retr_header(len(body)) + body + b".\r\n"
        self.assertEqual(proto._ahead, (4, body, expected))
        self.patch(server, "read_first", lambda *a: self.fail("the file was read again"))
        self.assertEqual(self.talk(proto, b"RETR 5"), expected)
        self.assertEqual(proto._ahead[0], 5)
        self.assertEqual(self.talk(proto, b"TOP 6 0"), R.TOP_HEADER + b"Subject: six\r\n\r\n.\r\n")

    def test_retrReadAheadSkipsDeleted(self) -> None:
        """Nothing is read ahead for a message marked deleted or past the end."""
        proto = self.session()
        self.talk(proto, b"DELE 2")
        self.talk(proto, b"RETR 1")
        self.assertIsNone(proto._ahead)

    def test_retrLargeStreams(self) -> None:
        """A message bigger than a chunk goes out through a producer, unchanged."""
        body = b"Subject: big\n\n" + b"".join(b".line %d\n" % i for i in range(40000))
        write_message(self.maildir, body, when=1900000000)
        proto = self.session()
        t = proto.transport
        out = self.talk(proto, b"RETR 4", b"NOOP")
        self.assertIs(t.producer, proto)  # the session is the producer again
        self.assertEqual(out, R.retr_header(mailbox.wire_size_of([body])) + mailbox.encode_message(body) + R.NOOP)
        self.assertGreater(len(t.writes), 3)

    def test_retrPausedProducer(self) -> None:
        """While the transport pauses the producer nothing is read; resume continues."""
        body = b"x" * (streamer.CHUNK * 3)
        write_message(self.maildir, body, when=1900000000)
        proto = self.session()
        t = proto.transport
        orig_write = t.write
        paused: list[bool] = []

        def write(data: bytes) -> None:
            orig_write(data)
            if isinstance(t.producer, streamer.MessageSender) and not paused:
                paused.append(True)
                t.producer.pauseProducing()

        t.write = write
        self.talk(proto, b"RETR 4", b"NOOP")
        self.assertIsNotNone(t.producer)
        self.assertLess(len(t.value()), streamer.CHUNK * 3)
        t.producer.resumeProducing()
        self.assertIs(t.producer, proto)  # the session is the producer again
        self.assertTrue(t.value().endswith(b"\r\n.\r\n" + R.NOOP))

    def test_dropDuringStream(self) -> None:
        """A connection lost in the middle of a RETR stops the producer and keeps everything."""
        body = b"x" * (streamer.CHUNK * 3)
        write_message(self.maildir, body, when=1900000000)
        proto = self.session()
        t = proto.transport
        t.write = lambda data, orig=t.write: (orig(data), t.producer and t.producer.pauseProducing())
        self.talk(proto, b"RETR 4")
        producer = t.producer
        producer.stopProducing()
        proto.connectionLost()
        self.assertEqual(len(message_files(self.maildir)), 4)

    def test_retrRenamedByOtherReader(self) -> None:
        """A message moved to cur/ with flags by another reader after login is still retrieved."""
        proto = self.session()
        os.rename(message_path(self.maildir, self.names[0]), os.path.join(self.maildir, "cur", self.names[0] + ":2,S"))
        self.assertEqual(
            self.talk(proto, b"RETR 1"), R.retr_header(self.sizes[0]) + mailbox.encode_message(self.bodies[0])
        )

    def test_retrGone(self) -> None:
        """A message deleted by someone else after login gives -ERR."""
        proto = self.session()
        os.unlink(message_path(self.maildir, self.names[0]))
        self.assertEqual(self.talk(proto, b"RETR 1"), R.MESSAGE_GONE)

    def test_top(self) -> None:
        """TOP n k sends the header, the blank line and k body lines."""
        proto = self.session()
        self.assertEqual(self.talk(proto, b"TOP 2 0"), R.TOP_HEADER + b"Subject: two\r\n\r\n.\r\n")
        self.assertEqual(self.talk(proto, b"TOP 2 1"), R.TOP_HEADER + b"Subject: two\r\n\r\n..dotted\r\n.\r\n")
        self.assertEqual(self.talk(proto, b"TOP 2 99"), R.TOP_HEADER + mailbox.encode_message(self.bodies[1]))

    def test_topBadArgs(self) -> None:
        """TOP needs a message number and a non-negative line count."""
        proto = self.session()
        self.assertEqual(
            self.talk(proto, b"TOP 1", b"TOP 1 -1", b"TOP x 1", b"TOP 9 1"), R.BAD_ARGUMENTS * 3 + R.NO_SUCH_MESSAGE
        )

    def test_topLargeMessage(self) -> None:
        """TOP of a big message stops early and never sends the whole file."""
        body = b"Subject: big\n\n" + b"y" * (streamer.CHUNK * 4)
        write_message(self.maildir, body, when=1900000000)
        proto = self.session()
        out = self.talk(proto, b"TOP 4 0")
        self.assertEqual(out, R.TOP_HEADER + b"Subject: big\r\n\r\n.\r\n")

    def test_deleRset(self) -> None:
        """DELE marks (STAT/LIST skip it, RETR/DELE refuse it); RSET unmarks."""
        proto = self.session()
        self.assertEqual(self.talk(proto, b"DELE 1"), R.deleted(1))
        self.assertEqual(self.talk(proto, b"STAT"), b"+OK 2 %d\r\n" % sum(self.sizes[1:]))
        self.assertNotIn(b"\r\n1 ", self.talk(proto, b"LIST"))
        self.assertEqual(
            self.talk(proto, b"RETR 1", b"DELE 1", b"LIST 1", b"UIDL 1", b"TOP 1 0"), R.ALREADY_DELETED * 5
        )
        self.assertEqual(self.talk(proto, b"RSET"), R.rset(3, sum(self.sizes)))
        self.assertEqual(self.talk(proto, b"STAT"), b"+OK 3 %d\r\n" % sum(self.sizes))

    def test_quitDeletes(self) -> None:
        """QUIT enters UPDATE: marked messages are unlinked, the rest stays."""
        proto = self.session()
        out = self.talk(proto, b"DELE 1", b"DELE 3", b"QUIT")
        self.assertEqual(out, R.deleted(1) + R.deleted(3) + R.signing_off(1))
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(os.listdir(os.path.join(self.maildir, "new")), [])
        self.assertEqual(os.listdir(os.path.join(self.maildir, "cur")), [self.names[1] + ":2,"])

    def test_quitMovesSeenToCur(self) -> None:
        """QUIT with nothing deleted still moves the messages from new/ to cur/."""
        proto = self.session()
        self.assertEqual(
            self.talk(proto, b"RETR 1"), R.retr_header(self.sizes[0]) + mailbox.encode_message(self.bodies[0])
        )
        self.assertEqual(self.talk(proto, b"QUIT"), R.signing_off(3))
        self.assertEqual(os.listdir(os.path.join(self.maildir, "new")), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.maildir, "cur"))), sorted(n + ":2," for n in self.names))

    def test_dropKeeps(self) -> None:
        """A dropped connection deletes nothing (RFC 1939 section 6)."""
        proto = self.session()
        self.talk(proto, b"DELE 1", b"DELE 2")
        proto.connectionLost()
        self.assertEqual(message_files(self.maildir), sorted(self.names))

    def test_listAfterDele(self) -> None:
        """LIST and UIDL skip deleted messages but keep the numbers of the others."""
        proto = self.session()
        self.talk(proto, b"DELE 2")
        self.assertEqual(
            self.talk(proto, b"LIST"),
            b"+OK 2 messages (%d octets)\r\n1 %d\r\n3 %d\r\n.\r\n"
            % (self.sizes[0] + self.sizes[2], self.sizes[0], self.sizes[2]),
        )
        self.assertEqual(
            self.talk(proto, b"UIDL"),
            R.UIDL_HEADER + b"1 %s\r\n3 %s\r\n.\r\n" % (self.names[0].encode(), self.names[2].encode()),
        )

    def test_quitPartialFailure(self) -> None:
        """If some marked messages cannot be removed, QUIT says -ERR [SYS/TEMP]."""
        proto = self.session()
        self.patch(mailbox.Maildrop, "update", lambda self: 1)
        self.assertEqual(self.talk(proto, b"DELE 1", b"QUIT"), R.deleted(1) + R.NOT_REMOVED)
        self.assertTrue(proto.transport.disconnecting)

    def test_noop(self) -> None:
        """NOOP answers +OK in TRANSACTION."""
        self.assertEqual(self.talk(self.session(), b"NOOP"), b"+OK\r\n")

    def test_newMailNotInSnapshot(self) -> None:
        """Mail arriving during a session is not seen until the next session."""
        proto = self.session()
        write_message(self.maildir, b"late\n", when=1900000000)
        self.assertEqual(self.talk(proto, b"STAT"), b"+OK 3 %d\r\n" % sum(self.sizes))
        self.assertEqual(self.talk(proto, b"LIST 4"), R.NO_SUCH_MESSAGE)


class StateAndLineTests(Base):
    def test_transactionCommandsNeedLogin(self) -> None:
        """STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP are refused in AUTHORIZATION."""
        proto = self.connect()
        cmds = [b"STAT", b"LIST", b"UIDL", b"RETR 1", b"TOP 1 1", b"DELE 1", b"RSET", b"NOOP"]
        self.assertEqual(self.talk(proto, *cmds), R.BAD_STATE * len(cmds))

    def test_authCommandsAfterLogin(self) -> None:
        """USER, PASS, AUTH and STLS are refused in TRANSACTION."""
        proto = self.session()
        cmds = [b"USER a", b"PASS b", b"AUTH PLAIN", b"STLS"]
        self.assertEqual(self.talk(proto, *cmds), R.BAD_STATE * len(cmds))

    def test_quitInAuthorization(self) -> None:
        """QUIT before login says goodbye and closes."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"QUIT"), R.BYE)
        self.assertTrue(proto.transport.disconnecting)

    def test_unknownCommand(self) -> None:
        """An unknown command gets -ERR; keywords are case-insensitive."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"APOP a b", b"capa")[: len(R.UNKNOWN_COMMAND)], R.UNKNOWN_COMMAND)

    def test_utf8(self) -> None:
        """RFC 6856: UTF8 is accepted before login (+OK), refused with an argument or after login."""
        proto = self.connect()
        self.assertEqual(self.talk(proto, b"UTF8 x", b"UTF8"), R.BAD_ARGUMENTS + R.UTF8_OK)
        self.assertEqual(
            self.talk(proto, b"USER alice@example.org", b"PASS secret", b"UTF8")[-len(R.BAD_STATE) :], R.BAD_STATE
        )

    def test_tooManyErrors(self) -> None:
        """After too many errors the server closes the connection."""
        proto = self.connect()
        out = self.talk(proto, *[b"BOGUS"] * server.MAX_ERRORS)
        self.assertTrue(out.endswith(R.TOO_MANY_ERRORS))
        self.assertTrue(proto.transport.disconnecting)

    def test_bareLF(self) -> None:
        """Lines ending in a bare LF are accepted."""
        proto = self.connect()
        proto.transport.clear()
        proto.dataReceived(b"CAPA\n")
        self.assertTrue(proto.transport.value().startswith(R.CAPA_HEADER))

    def test_lineTooLong(self) -> None:
        """A command line over 255 octets gets -ERR and the next command works."""
        proto = self.connect()
        out = self.talk(proto, b"USER " + b"a" * 251, b"NOOP")
        self.assertEqual(out, R.LINE_TOO_LONG + R.BAD_STATE)
        self.assertEqual(self.talk(proto, b"USER " + b"a" * 248), R.USER_OK)

    def test_lineTooLongAcrossReads(self) -> None:
        """An endless line is cut off once, skipped to its end, and the session goes on."""
        proto = self.connect()
        t = proto.transport
        t.clear()
        proto.dataReceived(b"X" * 3000)
        self.assertEqual(t.value(), R.LINE_TOO_LONG)
        proto.dataReceived(b"Y" * 3000)
        proto.dataReceived(b"Z" * 10 + b"\r\nCAPA\r\n")
        self.assertTrue(t.value().startswith(R.LINE_TOO_LONG + R.CAPA_HEADER))
        self.assertEqual(len(proto._buf), 0)

    def test_authLineMayBeLonger(self) -> None:
        """AUTH PLAIN initial responses may exceed 255 octets (RFC 5034 section 4)."""
        pw = b"p" * 400
        self.rt.checker.users[b"alice@localhost"] = pw
        proto = self.connect()
        self.assertIn(b"+OK Logged in", self.talk(proto, b"AUTH PLAIN " + plain(b"", b"alice@localhost", pw)))

    def test_pipelinedRepliesOneWrite(self) -> None:
        """All replies to one read go out in one write (RFC 2449 PIPELINING)."""
        write_message(self.maildir, b"a\n")
        proto = self.session()
        t = proto.transport
        t.writes.clear()
        proto.dataReceived(b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 1 0\r\nNOOP\r\n")
        self.assertEqual(len(t.writes), 1)
        self.assertTrue(t.writes[0].startswith(b"+OK 1 3\r\n"))

    def test_splitCommand(self) -> None:
        """A command split over several reads is assembled."""
        proto = self.connect()
        t = proto.transport
        t.clear()
        for b in (b"CA", b"PA\r", b"\n"):
            proto.dataReceived(b)
        self.assertTrue(t.value().startswith(R.CAPA_HEADER))


class IdleTests(Base):
    def test_autologout(self) -> None:
        """After pop3.idle_timeout without a command the server says -ERR and closes."""
        proto = self.session()
        proto.transport.clear()
        timeout = self.rt.config.pop3.idle_timeout
        self.assertEqual(timeout, 600)
        self.clock.advance(timeout - 1)
        self.assertFalse(proto.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(proto.transport.value(), R.AUTOLOGOUT)
        self.assertTrue(proto.transport.disconnecting)

    def test_commandsResetTimer(self) -> None:
        """Every command restarts the autologout timer."""
        proto = self.session()
        self.clock.advance(500)
        self.talk(proto, b"CAPA")
        self.clock.advance(500)
        self.assertFalse(proto.transport.disconnecting)
        self.clock.advance(100)
        self.assertTrue(proto.transport.disconnecting)

    def test_loginTimeout(self) -> None:
        """pop3.login_timeout after connecting without a login: -ERR [SYS/TEMP] and close,
        however often the client sends a command meanwhile."""
        proto = self.connect()
        self.assertEqual(self.rt.config.pop3.login_timeout, 60)
        for _ in range(5):
            self.clock.advance(11)
            self.talk(proto, b"NOOP")
        self.assertFalse(proto.transport.disconnecting)
        proto.transport.clear()
        self.clock.advance(5)
        self.assertEqual(proto.transport.value(), R.LOGIN_TIMEOUT)
        self.assertTrue(proto.transport.disconnecting)

    def test_noLoginTimeoutAfterLogin(self) -> None:
        """A session that logged in is not closed by the login timeout."""
        proto = self.session()
        self.clock.advance(120)
        self.assertFalse(proto.transport.disconnecting)
        self.assertEqual(proto.state, TRANSACTION)

    def test_autologoutDeletesNothing(self) -> None:
        """Autologout does not enter UPDATE: DELEd messages stay, the lock is released."""
        write_message(self.maildir, b"a\n")
        proto = self.session()
        self.talk(proto, b"DELE 1")
        self.clock.advance(600)
        self.assertTrue(proto.transport.disconnecting)
        proto.connectionLost()
        self.assertEqual(len(message_files(self.maildir)), 1)
        self.assertIn(b"+OK Logged in, 1 messages", self.login(self.connect()))

    def test_autologoutReleasesLockAtOnce(self) -> None:
        """The mailbox is free as soon as the server hangs up, even if the client
        never completes the close; after CLOSE_GRACE the connection is aborted."""
        proto = self.session()
        self.clock.advance(600)
        self.assertTrue(proto.transport.disconnecting)
        self.assertIn(b"+OK Logged in", self.login(self.connect()))
        self.assertFalse(proto.transport.aborted)
        self.clock.advance(session.CLOSE_GRACE)
        self.assertTrue(proto.transport.aborted)

    def test_stalledRetrAborted(self) -> None:
        """A client that stops reading in the middle of a RETR is aborted after a whole
        idle period without progress, and its lock is released; a slow one is not."""
        write_message(self.maildir, b"x" * (streamer.CHUNK * 4))
        proto = self.session()
        t = proto.transport
        t.write = lambda data, orig=t.write: (
            orig(data),
            isinstance(t.producer, streamer.MessageSender) and t.producer.pauseProducing(),
        )
        self.talk(proto, b"RETR 1")
        self.assertIsInstance(t.producer, streamer.MessageSender)
        self.clock.advance(600)
        t.producer.resumeProducing()  # some progress: the client is slow, not gone
        self.clock.advance(600)
        self.assertFalse(t.aborted)
        self.clock.advance(600)
        self.assertTrue(t.aborted)
        self.assertIn(b"+OK Logged in", self.login(self.connect()))

    def test_unreadRepliesBounded(self) -> None:
        """Pipelined commands whose replies the client does not read stop being
        processed once the transport's buffer is full, and resume when it drains;
        only a flood of unprocessed input stops reading."""
        for i in range(500):
            write_message(self.maildir, b"m\n", when=1700000000 + i)
        proto = self.session()
        t = proto.transport
        real_write = t.write
        t.write = lambda data: (real_write(data), proto.pauseProducing())  # buffer "full" at once
        t.clear()
        proto.dataReceived(b"UIDL\r\n" * 100)
        first = len(t.value())
        self.assertLess(first, 4 * session.FLUSH_AT)
        self.assertEqual(t.producerState, "producing")  # small input: reading goes on
        flood = server.PAUSE_INPUT_AT // 6 + 1
        proto.dataReceived(b"NOOP\r\n" * flood)
        self.assertEqual(t.producerState, "paused")  # a flood of unprocessed input: not any more
        self.assertEqual(len(t.value()), first)
        t.write = real_write
        proto.resumeProducing()
        self.assertEqual(t.value().count(R.UIDL_HEADER), 100)
        self.assertEqual(t.value().count(R.NOOP), flood)
        self.assertEqual(t.producerState, "producing")

    def test_unreadRepliesAutologout(self) -> None:
        """A client that leaves replies unread for a whole idle period is aborted."""
        proto = self.session()
        proto.pauseProducing()
        self.clock.advance(600)
        self.assertTrue(proto.transport.aborted)
        self.assertIsNone(proto.maildrop)

    def test_timerCancelledOnClose(self) -> None:
        """No timer is left behind after the connection is gone."""
        proto = self.connect()
        proto.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RepliesTests(SynchronousTestCase):
    def test_allRepliesWellFormed(self) -> None:
        """Every reply constant is +OK/-ERR (or a capability/continuation line) ending in CRLF."""
        for name in dir(R):
            value = getattr(R, name)
            if isinstance(value, bytes) and name not in ("CRLF",):
                self.assertTrue(value.endswith(b"\r\n"), name)
                self.assertEqual(value.count(b"\r\n"), 1, name)
                if not name.startswith("CAPA_") and name not in ("TERMINATOR", "AUTH_CONTINUE"):
                    self.assertTrue(value.startswith((b"+OK", b"-ERR")), name)

    def test_responseCodes(self) -> None:
        """The RFC 2449/3206 response codes are where they belong."""
        self.assertTrue(R.IN_USE.startswith(b"-ERR [IN-USE] "))
        for r in (R.LOGIN_FAILED, R.TLS_REQUIRED, R.LOCKED_OUT):
            self.assertTrue(r.startswith(b"-ERR [AUTH] "))
        for r in (R.MAILDROP_UNAVAILABLE, R.AUTH_SERVICE_FAILED, R.NOT_REMOVED, R.TOO_MANY_CONNECTIONS):
            self.assertTrue(r.startswith(b"-ERR [SYS/TEMP] "))
        self.assertTrue(R.MAILDROP_INVALID.startswith(b"-ERR [SYS/PERM] "))


class FakesTests(SynchronousTestCase):
    def test_fakeThrottleProvidesInterface(self) -> None:
        """The fake throttle used here provides ILoginThrottle like auth/throttle.py."""
        from zope.interface.verify import verifyObject

        from mailstack.interfaces import ILoginThrottle
        from tests.support.fakes import FakeThrottle

        self.assertTrue(verifyObject(ILoginThrottle, FakeThrottle()))


class DrainTests(Base):
    def test_idleSessionsClosed(self) -> None:
        """drain() tells idle sessions -ERR [SYS/TEMP] and closes them; DELEs are not carried out."""
        write_message(self.maildir, b"a\n")
        proto = self.session()
        self.talk(proto, b"DELE 1")
        proto.transport.clear()
        d = self.factory.drain(10)
        self.assertEqual(proto.transport.value(), R.SHUTTING_DOWN)
        self.assertTrue(proto.transport.disconnecting)
        self.assertNoResult(d)
        proto.connectionLost()
        self.clock.advance(0.05)
        self.successResultOf(d)
        self.assertEqual(len(message_files(self.maildir)), 1)

    def test_busySessionFinishesFirst(self) -> None:
        """A session slowed by a failed login ends after its reply; drain waits for it."""
        self.rt.throttle.delay = 2.0
        proto = self.connect()
        self.login(proto, pw=b"wrong")
        d = self.factory.drain(10)
        self.assertFalse(proto.transport.disconnecting)
        proto.transport.clear()
        self.clock.advance(2)
        self.assertEqual(proto.transport.value(), R.LOGIN_FAILED + R.SHUTTING_DOWN)
        proto.connectionLost()
        self.clock.advance(0.05)
        self.successResultOf(d)

    def test_timeoutAborts(self) -> None:
        """Sessions still there after the timeout are aborted."""
        self.rt.throttle.delay = 100.0
        proto = self.connect()
        self.login(proto, pw=b"wrong")
        d = self.factory.drain(1)
        self.clock.pump([0.05] * 25)
        self.successResultOf(d)
        self.assertTrue(proto.transport.aborted)


class AsyncBlockingTests(Base):
    """run_blocking as in production: results arrive later, from the 'thread pool'."""

    def setUp(self) -> None:
        super().setUp()
        self.pending: list[tuple[defer.Deferred, object, tuple]] = []

        def run_blocking(f, *a, **kw):  # type: ignore[no-untyped-def]
            d: defer.Deferred = defer.Deferred()
            self.pending.append((d, f, a))
            return d

        self.rt.run_blocking = run_blocking

    def run_all(self) -> None:
        while self.pending:
            d, f, a = self.pending.pop(0)
            try:
                result = f(*a)
            except Exception:
                d.errback()
            else:
                d.callback(result)

    def test_loginAndStreamedRetr(self) -> None:
        """Login and a streamed RETR complete with late results; pipelined commands wait their turn."""
        body = b"Subject: big\n\n" + b"".join(b".%d\n" % i for i in range(60000))
        write_message(self.maildir, body)
        proto = self.connect()
        t = proto.transport
        t.clear()
        proto.dataReceived(b"USER alice@localhost\r\nPASS secret\r\nSTAT\r\n")
        self.assertEqual(t.value(), R.USER_OK)
        self.run_all()
        size = mailbox.wire_size_of([body])
        self.assertEqual(t.value(), R.USER_OK + b"+OK Logged in, 1 messages (%d octets)\r\n+OK 1 %d\r\n" % (size, size))
        t.clear()
        proto.dataReceived(b"RETR 1\r\nNOOP\r\n")
        self.assertTrue(self.pending)  # the rest of the file is read in the pool
        self.run_all()
        self.assertEqual(t.value(), R.retr_header(size) + mailbox.encode_message(body) + R.NOOP)
        self.assertIs(t.producer, proto)  # the session is the producer again

    def test_quitWaitsForDeletion(self) -> None:
        """QUIT answers only after the deletions ran in the pool."""
        write_message(self.maildir, b"a\n")
        proto = self.connect()
        self.login(proto)
        self.run_all()
        out = self.talk(proto, b"DELE 1", b"QUIT")
        self.assertEqual(out, R.deleted(1))
        self.assertEqual(len(message_files(self.maildir)), 1)
        proto.transport.clear()
        self.run_all()
        self.assertEqual(proto.transport.value(), R.signing_off(0))
        self.assertEqual(message_files(self.maildir), [])

    def test_dropWhileLocking(self) -> None:
        """A client gone before the maildrop is opened leaves no lock behind."""
        proto = self.connect()
        self.login(proto)
        proto.connectionLost()
        self.run_all()
        drop = mailbox.Maildrop.open(self.maildir)
        drop.close()


class LogInjectionTests(Base):
    def test_loginNameEscaped(self) -> None:
        """A login name with CR, ESC and C1 controls reaches the failed-login log event escaped:
        the event's text holds no raw control character."""
        events: list[dict] = []
        proto = self.connect()
        proto.log = Logger(observer=events.append)
        self.talk(proto, b"USER evil\r\x1b[2Jforged\xc2\x9b", b"PASS wrong")
        self.clock.advance(10)
        texts = [formatEvent(e) for e in events]
        self.assertTrue(any("forged" in t for t in texts), texts)
        for t in texts:
            self.assertIsNone(re.search(r"[\x00-\x1f\x7f-\x9f]", t), t)
