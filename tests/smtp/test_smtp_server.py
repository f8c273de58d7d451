"""Tests for mailstack.smtp.server: conversations with exact reply codes."""

from __future__ import annotations

import base64

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.address import Address
from mailstack.errors import Reply, TemporaryFailure
from mailstack.interfaces import IIncoming, IIntake, ILoginThrottle, IRouter
from mailstack.smtp.factory import SMTPFactory, make_factory
from tests.support.fakes import FakeChecker, FakeIncoming, FakeIntake, FakeRouter, FakeThrottle
from tests.support.runtime import fake_runtime

from .data_reference import SMUGGLING
from .support import Session, make_config, make_runtime

B64 = base64.b64encode


def plain(user: bytes, pw: bytes, authz: bytes = b"") -> bytes:
    return B64(authz + b"\0" + user + b"\0" + pw)


def ehlo_keywords(lines: list[bytes]) -> list[bytes]:
    return [line[4:] for line in lines[1:]]


class GreetingTests(SynchronousTestCase):
    def test_banner(self) -> None:
        """The banner is 220 <hostname> ESMTP mailstack."""
        s = Session()
        self.assertEqual(s.banner, b"220 mx.example.org ESMTP mailstack\r\n")

    def test_ehloPlaintextMX(self) -> None:
        """Plaintext MX: PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, STARTTLS; no AUTH, no SMTPUTF8."""
        s = Session()
        lines = s.talk(b"EHLO client.test")
        self.assertEqual(lines[0], b"250-mx.example.org Hello client.test")
        self.assertEqual(
            ehlo_keywords(lines),
            [
                b"PIPELINING",
                b"SIZE 10000",
                b"8BITMIME",
                b"ENHANCEDSTATUSCODES",
                b"CHUNKING",
                b"DSN",
                b"SMTPUTF8",
                b"STARTTLS",
            ],
        )
        self.assertTrue(lines[-1].startswith(b"250 "))

    def test_ehloAfterTLS(self) -> None:
        """After STARTTLS: no STARTTLS, AUTH PLAIN LOGIN offered."""
        s = Session("submission")
        s.talk(b"EHLO c")
        s.talk(b"STARTTLS")
        kw = ehlo_keywords(s.talk(b"EHLO c"))
        self.assertNotIn(b"STARTTLS", kw)
        self.assertIn(b"AUTH PLAIN LOGIN", kw)

    def test_ehloSubmissions(self) -> None:
        """Implicit TLS: AUTH offered at once, STARTTLS never."""
        s = Session("submissions")
        kw = ehlo_keywords(s.talk(b"EHLO c"))
        self.assertIn(b"AUTH PLAIN LOGIN", kw)
        self.assertNotIn(b"STARTTLS", kw)

    def test_ehloLoopbackPlaintextAuth(self) -> None:
        """With plaintext_on_loopback, AUTH is offered without TLS to 127.0.0.1 only."""
        rt = make_runtime(auth={"plaintext_on_loopback": True})
        self.assertIn(b"AUTH PLAIN LOGIN", ehlo_keywords(Session("submission", rt, peer="127.0.0.1").talk(b"EHLO c")))
        rt = make_runtime(auth={"plaintext_on_loopback": True})
        self.assertNotIn(b"AUTH PLAIN LOGIN", ehlo_keywords(Session("submission", rt).talk(b"EHLO c")))

    def test_helo(self) -> None:
        """HELO gets a one-line 250; missing argument is 501 5.5.4."""
        s = Session()
        self.assertEqual(s.talk(b"HELO client.test"), [b"250 mx.example.org Hello client.test"])
        self.assertEqual(s.codes(b"HELO"), [b"501 5.5.4"])
        self.assertEqual(s.codes(b"EHLO"), [b"501 5.5.4"])

    def test_simpleCommands(self) -> None:
        """NOOP 250, RSET 250, VRFY 252 2.5.0, HELP 214, EXPN 502, unknown 500 5.5.2, QUIT 221 and close."""
        s = Session()
        self.assertEqual(
            s.codes(b"NOOP", b"RSET", b"VRFY alice", b"HELP", b"EXPN x", b"FOO", b"QUIT"),
            [b"250 2.0.0", b"250 2.0.0", b"252 2.5.0", b"214 2.0.0", b"502 5.5.1", b"500 5.5.2", b"221 2.0.0"],
        )
        self.assertTrue(s.closed)

    def test_caseInsensitiveVerbs(self) -> None:
        """Verbs are case-insensitive (RFC 5321 2.4)."""
        s = Session()
        self.assertEqual(s.codes(b"ehlo c")[-1:], [b"250 START"])
        self.assertEqual(s.codes(b"mail from:<a@b.test>"), [b"250 2.1.0"])

    def test_nothingAfterQuit(self) -> None:
        """Commands pipelined after QUIT are not executed."""
        s = Session()
        out = s.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(out, b"221 2.0.0 Bye\r\n")


class MailRcptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.s = Session()
        self.s.talk(b"EHLO client.test")

    def test_mailNeedsHelo(self) -> None:
        """MAIL before EHLO/HELO is 503 5.5.1."""
        self.assertEqual(Session().codes(b"MAIL FROM:<a@b.test>"), [b"503 5.5.1"])

    def test_mailSyntax(self) -> None:
        """Bad paths are 501 5.1.7; missing FROM: is 501 5.5.4; null sender accepted."""
        s = self.s
        self.assertEqual(s.codes(b"MAIL FROM:a@b.test"), [b"501 5.1.7"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@@b>"), [b"501 5.1.7"])
        self.assertEqual(s.codes(b"MAIL TO:<a@b.test>"), [b"501 5.5.4"])
        self.assertEqual(s.codes(b"MAIL FROM:<>"), [b"250 2.1.0"])

    def test_mailNested(self) -> None:
        """A second MAIL in a transaction is 503 5.5.1."""
        self.assertEqual(self.s.codes(b"MAIL FROM:<a@b.test>", b"MAIL FROM:<a@b.test>"), [b"250 2.1.0", b"503 5.5.1"])

    def test_mailSpaceAfterColon(self) -> None:
        """'MAIL FROM: <x>' (a common client quirk) is accepted."""
        self.assertEqual(self.s.codes(b"MAIL FROM: <a@b.test>"), [b"250 2.1.0"])

    def test_sizeParameter(self) -> None:
        """SIZE= within limit 250, over the limit 552 5.3.4, not a number 501 5.5.4."""
        s = self.s
        self.assertEqual(s.codes(b"MAIL FROM:<a@b.test> SIZE=10001"), [b"552 5.3.4"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@b.test> SIZE=abc"), [b"501 5.5.4"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@b.test> SIZE=10000 BODY=8BITMIME"), [b"250 2.1.0"])

    def test_bodyParameter(self) -> None:
        """BODY=7BIT and BODY=8BITMIME accepted, other values 501."""
        s = self.s
        self.assertEqual(s.codes(b"MAIL FROM:<a@b.test> BODY=BINARYMIME"), [b"501 5.5.4"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@b.test> BODY=7BIT"), [b"250 2.1.0"])

    def test_unknownParameter(self) -> None:
        """Unknown MAIL and RCPT parameters are 555 5.5.4."""
        s = self.s
        self.assertEqual(s.codes(b"MAIL FROM:<a@b.test> SMTPUTF8=yes"), [b"555 5.5.4"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@b.test> XFOO=1"), [b"555 5.5.4"])
        s.talk(b"MAIL FROM:<a@b.test>")
        self.assertEqual(s.codes(b"RCPT TO:<alice@example.org> XFOO"), [b"555 5.5.4"])

    def test_rcptNeedsMail(self) -> None:
        """RCPT before MAIL is 503 5.5.1."""
        self.assertEqual(self.s.codes(b"RCPT TO:<alice@example.org>"), [b"503 5.5.1"])

    def test_rcptChecks(self) -> None:
        """Local user 250; unknown local 550 5.1.1; remote unauthenticated 550 5.7.1; bad syntax 501 5.1.3."""
        s = self.s
        s.talk(b"MAIL FROM:<x@remote.test>")
        self.assertEqual(
            s.codes(
                b"RCPT TO:<alice@example.org>",
                b"RCPT TO:<nobody@example.org>",
                b"RCPT TO:<someone@remote.test>",
                b"RCPT TO:<bad@@x>",
                b"RCPT TO:<>",
            ),
            [b"250 2.1.5", b"550 5.1.1", b"550 5.7.1", b"501 5.1.3", b"501 5.1.3"],
        )
        self.assertEqual(s.runtime.router.calls[0], (Address("alice", "example.org"), False))

    def test_rcptTempfail(self) -> None:
        """A TemporaryFailure from the router gives its 4xx reply."""
        self.s.talk(b"MAIL FROM:<x@remote.test>")
        self.assertEqual(self.s.codes(b"RCPT TO:<tempfail@example.org>"), [b"451 4.3.0"])

    def test_postmasterWithoutDomain(self) -> None:
        """RCPT TO:<postmaster> (no domain) is accepted (RFC 5321 4.1.1.3)."""
        self.s.talk(b"MAIL FROM:<x@remote.test>")
        self.assertEqual(self.s.codes(b"RCPT TO:<Postmaster>"), [b"250 2.1.5"])
        self.assertEqual(self.s.runtime.router.calls[-1][0], Address("postmaster", "example.org"))

    def test_maxRecipients(self) -> None:
        """More than max_recipients RCPTs: 452 4.5.3."""
        s = Session(runtime=make_runtime(smtp={"max_recipients": 2}))
        s.talk(b"EHLO c", b"MAIL FROM:<x@remote.test>")
        self.assertEqual(
            s.codes(b"RCPT TO:<alice@example.org>", b"RCPT TO:<bob@example.org>", b"RCPT TO:<alice@example.org>"),
            [b"250 2.1.5", b"250 2.1.5", b"452 4.5.3"],
        )

    def test_dataSequence(self) -> None:
        """DATA without MAIL 503; without any RCPT 503; with only rejected RCPTs 554 5.5.1; with args 501."""
        s = self.s
        self.assertEqual(s.codes(b"DATA"), [b"503 5.5.1"])
        s.talk(b"MAIL FROM:<x@remote.test>")
        self.assertEqual(s.codes(b"DATA"), [b"503 5.5.1"])
        s.talk(b"RCPT TO:<nobody@example.org>")
        self.assertEqual(s.codes(b"DATA"), [b"554 5.5.1"])
        self.assertEqual(s.codes(b"DATA x"), [b"501 5.5.4"])

    def test_rsetClearsTransaction(self) -> None:
        """After RSET, RCPT needs a new MAIL."""
        s = self.s
        s.talk(b"MAIL FROM:<x@remote.test>", b"RSET")
        self.assertEqual(s.codes(b"RCPT TO:<alice@example.org>"), [b"503 5.5.1"])

    def test_duplicateRecipients(self) -> None:
        """The same mailbox twice is one destination."""
        s = self.s
        s.talk(b"MAIL FROM:<x@remote.test>", b"RCPT TO:<alice@example.org>", b"RCPT TO:<ALICE@example.org>")
        s.send(b"DATA\r\nhi\r\n.\r\n")
        self.assertEqual(len(s.intake.committed[0].envelope.recipients), 1)


def transaction(
    sender: bytes = b"x@remote.test", rcpt: bytes = b"alice@example.org", body: bytes = b"Subject: t\r\n\r\nhello\r\n"
) -> bytes:
    return b"MAIL FROM:<" + sender + b">\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n" + body + b".\r\n"


class DataTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.s = Session()
        self.s.talk(b"EHLO client.test")

    def test_accepted(self) -> None:
        """A message is streamed to the intake and 250 2.0.0 names the queue id."""
        s = self.s
        out = s.send(transaction())
        self.assertEqual(
            out,
            b"250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            b"250 2.0.0 Ok: queued as Q1\r\n",
        )
        inc = s.intake.committed[0]
        self.assertEqual(inc.data, b"Subject: t\r\n\r\nhello\r\n")
        env = inc.envelope
        self.assertEqual(env.sender, Address("x", "remote.test"))
        self.assertEqual(env.helo, "client.test")
        self.assertEqual(env.peer, "192.0.2.7")
        self.assertEqual(env.protocol, "ESMTP")
        self.assertEqual(env.tls, "")

    def test_repliesBatchedInOneWrite(self) -> None:
        """All replies to one pipelined read go out in one transport.write."""
        writes = []
        orig = self.s.transport.write
        self.s.transport.write = lambda data: (writes.append(data), orig(data))
        self.s.send(transaction())
        self.assertEqual(len(writes), 1)

    def test_250OnlyAfterCommit(self) -> None:
        """Nothing after 354 until finish() fires; then 250; later pipelined commands wait."""
        s = self.s
        s.intake.manual = True
        out = s.send(transaction() + b"NOOP\r\n")
        self.assertTrue(out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"))
        inc = s.intake.begun[0]
        inc.commit("ABC")
        self.assertEqual(s.take(), b"250 2.0.0 Ok: queued as ABC\r\n250 2.0.0 Ok\r\n")

    def test_commitFailure(self) -> None:
        """A TemporaryFailure from finish() gives its reply (451 4.3.0 / 452 4.3.1)."""
        s = self.s
        s.intake.fail_with = TemporaryFailure(Reply(452, "4.3.1", "Insufficient system storage"))
        out = s.send(transaction())
        self.assertTrue(out.endswith(b"452 4.3.1 Insufficient system storage\r\n"))
        s.intake.fail_with = RuntimeError("boom /secret/path")
        out = s.send(transaction())
        self.assertTrue(out.endswith(b"451 4.3.0 Local error in processing, try again later\r\n"))
        self.assertNotIn(b"secret", out)
        self.flushLoggedErrors(RuntimeError)

    def test_dotUnstuffing(self) -> None:
        """Leading dots are unstuffed; a line of two dots is one dot."""
        s = self.s
        s.send(transaction(body=b"..hidden\r\n..\r\nok.\r\n"))
        self.assertEqual(s.intake.committed[0].data, b".hidden\r\n.\r\nok.\r\n")

    def test_eightBitAndLongLines(self) -> None:
        """8-bit bytes and a 998-byte line arrive untouched."""
        s = self.s
        body = b"Subject: \xc3\xa9\r\n\r\n" + b"y" * 998 + b"\r\n\xff\xfe\r\n"
        s.send(transaction(body=body))
        self.assertEqual(s.intake.committed[0].data, body)

    def test_longLineThenFakeTransaction(self) -> None:
        """A 100 KB line followed by what looks like a new transaction yields exactly one message."""
        s = Session(runtime=make_runtime(smtp={"max_message_size": 1_000_000}))
        s.talk(b"EHLO client.test")
        body = b"a" * 100_000 + b"\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nevil\r\n"
        for chunked in (False, True):
            before = len(s.intake.committed)
            data = transaction(body=body)
            if chunked:
                for i in range(0, len(data), 1000):
                    s.proto.dataReceived(data[i : i + 1000])
                out = s.take()
            else:
                out = s.send(data)
            self.assertEqual(len(s.intake.committed), before + 1)
            self.assertEqual(s.intake.committed[-1].data, body)
            self.assertEqual(out.count(b"250 2.0.0"), 1)
            self.assertEqual(out.count(b"250 2.1.0"), 1)

    def test_sizeEnforcedWhileStreaming(self) -> None:
        """Over max_message_size: read to the end, abort, 552 5.3.4, session stays in sync."""
        s = self.s
        out = s.send(transaction(body=b"z" * 20000 + b"\r\n") + b"NOOP\r\n")
        self.assertTrue(out.endswith(b"552 5.3.4 Message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n"))
        self.assertTrue(s.intake.begun[0].aborted)
        self.assertEqual(s.intake.committed, [])
        self.assertLessEqual(len(s.intake.begun[0].data), 10000)

    def test_bareLFRejected(self) -> None:
        """Content with a bare LF is rejected after the terminator with 550 5.6.0."""
        s = self.s
        out = s.send(transaction(body=b"line one\nline two\r\n"))
        self.assertTrue(
            out.endswith(
                b"550 5.6.0 Message contains a bare CR or LF; lines must end with CRLF (SMTP smuggling protection)\r\n"
            )
        )
        self.assertEqual(s.intake.committed, [])
        self.assertTrue(s.intake.begun[0].aborted)

    def test_connectionLostMidData(self) -> None:
        """Connection lost during DATA aborts the incoming message."""
        s = self.s
        s.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\npartial")
        s.proto.connectionLost(None)
        self.assertTrue(s.intake.begun[0].aborted)

    def test_connectionLostDuringCommitDoesNotAbort(self) -> None:
        """Once the data is complete, a lost connection does not abort the commit."""
        s = self.s
        s.intake.manual = True
        s.send(transaction())
        s.proto.connectionLost(None)
        inc = s.intake.begun[0]
        self.assertFalse(inc.aborted)
        inc.commit("Q")

    def test_twoMessagesPipelined(self) -> None:
        """Two pipelined transactions in one read give two messages in order."""
        s = self.s
        out = s.send(transaction(body=b"one\r\n") + transaction(body=b"two\r\n"))
        self.assertEqual([i.data for i in s.intake.committed], [b"one\r\n", b"two\r\n"])
        self.assertEqual(out.count(b"Ok: queued"), 2)




class SmugglingTests(SynchronousTestCase):
    def probe(self, seq: bytes, bytewise: bool) -> tuple[Session, bytes]:
        s = Session()
        s.talk(b"EHLO client.test")
        data = (
            b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
            b"From: x@remote.test\r\nSubject: probe\r\n\r\nTESTING fake end-of-data"
            + seq
            + b"mail FROM:<admin@example.org>\r\nrcpt TO:<bob@example.org>\r\ndata\r\n"
            b"From: admin@example.org\r\nSubject: SMUGGLED\r\n\r\nsmuggled\r\n.\r\nQUIT\r\n"
        )
        out = s.send_bytewise(data) if bytewise else s.send(data)
        return s, out

    def test_smugglingSequences(self) -> None:
        """Every scanner sequence (the SMTP smuggling end-of-data lookalikes, see smtp/data.py), in one write and
        byte by byte: never two messages."""
        for seq in SMUGGLING:
            for bytewise in (False, True):
                s, out = self.probe(seq, bytewise)
                self.assertLessEqual(len(s.intake.committed), 1, (seq, bytewise))
                self.assertEqual(len(s.intake.begun), 1, (seq, bytewise))
                self.assertEqual(out.count(b"354 "), 1, (seq, bytewise))
                self.assertNotIn(b"503", out)
                self.assertTrue(out.endswith(b"221 2.0.0 Bye\r\n"), (seq, out))
                for inc in s.intake.committed:
                    self.assertIn(b"SMUGGLED", inc.data)  # the "second" message stayed content

    def test_bareLFSequencesRejected(self) -> None:
        """Sequences with a bare CR or LF make the whole message rejected (550 5.6.0), not split."""
        for seq in SMUGGLING:
            s, out = self.probe(seq, False)
            raw_bare = (b"\r" in seq.replace(b"\r\n", b"")) or (b"\n" in seq.replace(b"\r\n", b""))
            if raw_bare:
                self.assertEqual(s.intake.committed, [], seq)
                self.assertIn(b"550 5.6.0", out)


class StartTLSTests(SynchronousTestCase):
    def test_pipelinedAfterStartTLSDiscarded(self) -> None:
        """STARTTLS with a command pipelined behind it in the same packet: only 220, the command is not executed."""
        s = Session("submission")
        s.talk(b"EHLO c")
        out = s.send(b"STARTTLS\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n")
        self.assertEqual(out, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIs(s.transport.tls_context, s.runtime.tls.context)
        # The reply was written before TLS started.
        self.assertEqual(s.transport.tls_started_at, len(out))
        self.assertEqual(s.runtime.router.calls, [])

    def test_mxStartTLSInjection(self) -> None:
        """Same on the MX listener: a pipelined MAIL after STARTTLS gets no reply."""
        s = Session("smtp")
        out = s.send(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@b.test>\r\n")
        self.assertTrue(out.endswith(b"220 2.0.0 Ready to start TLS\r\n"))
        self.assertNotIn(b"250 2.1.0", out)

    def test_stateResetAfterTLS(self) -> None:
        """After STARTTLS the client must EHLO again (RFC 3207 4.2)."""
        s = Session("smtp")
        s.talk(b"EHLO c", b"STARTTLS")
        self.assertEqual(s.codes(b"MAIL FROM:<a@b.test>"), [b"503 5.5.1"])

    def test_startTLSTwice(self) -> None:
        """STARTTLS in TLS is 503; with an argument 501; on submissions 503 (already TLS)."""
        s = Session("submission")
        s.talk(b"EHLO c")
        self.assertEqual(s.codes(b"STARTTLS now"), [b"501 5.5.4"])
        s.talk(b"STARTTLS")
        self.assertEqual(s.codes(b"EHLO c", b"STARTTLS")[-1:], [b"503 5.5.1"])
        self.assertEqual(Session("submissions").codes(b"STARTTLS"), [b"503 5.5.1"])

    def test_noTLSTransport(self) -> None:
        """A transport that cannot do TLS: STARTTLS not offered, 502 5.5.1."""
        s = Session("smtp", transport=StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1)))
        self.assertNotIn(b"STARTTLS", ehlo_keywords(s.talk(b"EHLO c")))
        self.assertEqual(s.codes(b"STARTTLS"), [b"502 5.5.1"])

    def test_protocolAndTLSInEnvelope(self) -> None:
        """After STARTTLS+AUTH the envelope says ESMTPSA and names TLS version and cipher."""
        s = Session("submission")
        s.login()
        s.send(transaction(sender=b"alice@example.org", rcpt=b"bob@example.org"))
        env = s.intake.committed[0].envelope
        self.assertEqual(env.protocol, "ESMTPSA")
        self.assertEqual(env.tls, "TLSv1.3 TLS_AES_256_GCM_SHA384")
        self.assertEqual(env.user, "alice@example.org")


class SubmissionTests(SynchronousTestCase):
    def test_authBeforeTLS(self) -> None:
        """Submission: AUTH before STARTTLS is 530 5.7.0 Must issue a STARTTLS command first."""
        s = Session("submission")
        s.talk(b"EHLO c")
        self.assertEqual(
            s.talk(b"AUTH PLAIN " + plain(b"alice@example.org", b"secret")),
            [b"530 5.7.0 Must issue a STARTTLS command first"],
        )
        self.assertEqual(s.runtime.checker.calls, [])

    def test_mailBeforeAuth(self) -> None:
        """Submission: MAIL before AUTH is 530 5.7.0 Authentication required (also after TLS)."""
        s = Session("submission")
        s.talk(b"EHLO c")
        self.assertEqual(s.talk(b"MAIL FROM:<alice@example.org>"), [b"530 5.7.0 Authentication required"])
        s.talk(b"STARTTLS", b"EHLO c")
        self.assertEqual(s.codes(b"MAIL FROM:<alice@example.org>"), [b"530 5.7.0"])
        self.assertEqual(Session("submissions").codes(b"EHLO c", b"MAIL FROM:<alice@example.org>")[-1], b"530 5.7.0")

    def test_authPlainInitialResponse(self) -> None:
        """AUTH PLAIN with an initial response: 235 2.7.0; throttle told of the success."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        self.assertEqual(
            s.talk(b"AUTH PLAIN " + plain(b"alice@example.org", b"secret")), [b"235 2.7.0 Authentication successful"]
        )
        self.assertEqual(s.runtime.throttle.successes, [("192.0.2.7", "alice@example.org")])
        self.assertEqual(s.codes(b"MAIL FROM:<alice@example.org>"), [b"250 2.1.0"])

    def test_authPlainChallenge(self) -> None:
        """AUTH PLAIN without initial response: '334 ' then the response."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        self.assertEqual(s.send(b"AUTH PLAIN\r\n"), b"334 \r\n")
        self.assertEqual(s.codes(plain(b"alice@example.org", b"secret")), [b"235 2.7.0"])

    def test_authLogin(self) -> None:
        """AUTH LOGIN: Username: and Password: challenges, then 235."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        self.assertEqual(s.send(b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(s.send(B64(b"bob@example.org") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.codes(B64(b"hunter2")), [b"235 2.7.0"])
        self.assertEqual(s.proto.user, "bob@example.org")

    def test_authLoginInitialResponse(self) -> None:
        """AUTH LOGIN <username>: straight to the password challenge."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        self.assertEqual(s.send(b"AUTH LOGIN " + B64(b"bob@example.org") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.codes(B64(b"hunter2")), [b"235 2.7.0"])

    def test_authCancel(self) -> None:
        """'*' cancels: 501 5.7.0."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        s.send(b"AUTH LOGIN\r\n")
        self.assertEqual(s.codes(b"*"), [b"501 5.7.0"])
        self.assertEqual(s.codes(b"NOOP"), [b"250 2.0.0"])

    def test_authBadBase64(self) -> None:
        """Undecodable response: 501 5.5.2, back to commands."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        self.assertEqual(s.codes(b"AUTH PLAIN !!!notbase64"), [b"501 5.5.2"])
        self.assertEqual(s.codes(b"NOOP"), [b"250 2.0.0"])

    def test_unknownMechanism(self) -> None:
        """AUTH CRAM-MD5 is 504 5.5.4."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        self.assertEqual(s.codes(b"AUTH CRAM-MD5"), [b"504 5.5.4"])

    def test_badCredentialsDelayed(self) -> None:
        """Bad password: 535 5.7.8 only after the throttle's delay; later commands wait for it."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        out = s.send(b"AUTH PLAIN " + plain(b"alice@example.org", b"wrong") + b"\r\nNOOP\r\n")
        self.assertEqual(out, b"")
        self.assertEqual(s.runtime.throttle.failures, [("192.0.2.7", "alice@example.org")])
        s.clock.advance(1.9)
        self.assertEqual(s.take(), b"")
        s.clock.advance(0.1)
        self.assertEqual(s.take(), b"535 5.7.8 Authentication credentials invalid\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(s.proto.user, "")

    def test_lockedOut(self) -> None:
        """While the throttle locks the account: 454 4.7.0 and the checker is not asked."""
        s = Session("submissions")
        s.runtime.throttle.locked_out.add("alice@example.org")
        s.talk(b"EHLO c")
        self.assertEqual(s.codes(b"AUTH PLAIN " + plain(b"alice@example.org", b"secret")), [b"454 4.7.0"])
        self.assertEqual(s.runtime.checker.calls, [])

    def test_authzidMismatch(self) -> None:
        """PLAIN with an authorization identity other than the user: 535 5.7.8."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        s.send(b"AUTH PLAIN " + plain(b"alice@example.org", b"secret", authz=b"bob@example.org") + b"\r\n")
        s.clock.advance(10)
        self.assertEqual(s.take()[:9], b"535 5.7.8")

    def test_authTwice(self) -> None:
        """AUTH after success: 503 5.5.1."""
        s = Session("submissions")
        s.login()
        self.assertEqual(s.codes(b"AUTH PLAIN " + plain(b"alice@example.org", b"secret")), [b"503 5.5.1"])

    def test_pipelinedAfterAuthWaits(self) -> None:
        """Commands pipelined behind AUTH are answered after the (slow) check, in order."""
        s = Session("submissions")
        s.runtime.checker.manual = True
        s.talk(b"EHLO c")
        out = s.send(b"AUTH PLAIN " + plain(b"alice@example.org", b"secret") + b"\r\nMAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(out, b"")
        s.runtime.checker.pending[0].callback("alice@example.org")
        self.assertEqual(s.take(), b"235 2.7.0 Authentication successful\r\n250 2.1.0 Sender ok\r\n")

    def test_pausesWhileBlocked(self) -> None:
        """Lots of input while a check is pending pauses the transport; it resumes afterwards."""
        s = Session("submissions")
        s.runtime.checker.manual = True
        s.talk(b"EHLO c")
        s.send(b"AUTH PLAIN " + plain(b"alice@example.org", b"secret") + b"\r\n" + b"NOOP\r\n" * 50000)
        self.assertEqual(s.transport.producerState, "paused")
        s.runtime.checker.pending[0].callback("alice@example.org")
        self.assertEqual(s.transport.producerState, "producing")
        self.assertEqual(s.take().count(b"250 2.0.0 Ok\r\n"), 50000)

    def test_senderOwnership(self) -> None:
        """Own address and aliases expanding to the user 250; others and <> 553 5.7.1."""
        s = Session("submissions")
        s.login()
        for sender, code in (
            (b"<bob@example.org>", b"553 5.7.1"),
            (b"<>", b"553 5.7.1"),
            (b"<team@example.org>", b"553 5.7.1"),
            (b"<Alice@Example.org>", b"250 2.1.0"),
            (b"<sales@example.org>", b"250 2.1.0"),
        ):
            self.assertEqual(s.codes(b"MAIL FROM:" + sender), [code], sender)
            s.talk(b"RSET")

    def test_authenticatedRelay(self) -> None:
        """Authenticated sessions may relay (router called with authenticated=True), also on MX after TLS."""
        s = Session("smtp")
        s.login()
        s.talk(b"MAIL FROM:<alice@example.org>")
        self.assertEqual(s.codes(b"RCPT TO:<friend@remote.test>"), [b"250 2.1.5"])
        self.assertEqual(s.runtime.router.calls[-1][1], True)

    def test_rateLimit(self) -> None:
        """After messages_per_hour messages within an hour, MAIL is 451 4.7.1; an hour later fine again."""
        rt = make_runtime(limits={"messages_per_hour": 2})
        s = Session("submissions", rt)
        s.login()
        for _ in range(2):
            self.assertIn(b"Ok: queued", s.send(transaction(sender=b"alice@example.org", rcpt=b"bob@example.org")))
        self.assertEqual(s.codes(b"MAIL FROM:<alice@example.org>"), [b"451 4.7.1"])
        # Shared across listeners of the same runtime.
        other = Session("submission", rt)
        other.login()
        self.assertEqual(other.codes(b"MAIL FROM:<alice@example.org>"), [b"451 4.7.1"])
        rt.reactor.advance(3601)
        later = Session("submissions", rt)
        later.login()
        self.assertEqual(later.codes(b"MAIL FROM:<alice@example.org>"), [b"250 2.1.0"])

    def test_limitReservedAtMailReleasedOnRset(self) -> None:
        """A transaction holds its message against the limit from MAIL on (a second session
        of the same user is refused while it is open); RSET releases it."""
        rt = make_runtime(limits={"messages_per_hour": 1})
        first = Session("submissions", rt)
        first.login()
        self.assertEqual(first.codes(b"MAIL FROM:<alice@example.org>"), [b"250 2.1.0"])
        second = Session("submissions", rt)
        second.login()
        self.assertEqual(second.codes(b"MAIL FROM:<alice@example.org>"), [b"451 4.7.1"])
        first.talk(b"RSET")
        self.assertEqual(second.codes(b"MAIL FROM:<alice@example.org>"), [b"250 2.1.0"])
        second.transport.loseConnection()
        second.proto.connectionLost(None)
        self.assertEqual(first.codes(b"MAIL FROM:<alice@example.org>"), [b"250 2.1.0"])

    def test_dailyLimitNamed(self) -> None:
        """messages_per_day refuses MAIL with 451 4.7.1 naming the daily limit."""
        rt = make_runtime(limits={"messages_per_hour": 0, "messages_per_day": 1})
        s = Session("submissions", rt)
        s.login()
        self.assertIn(b"Ok: queued", s.send(transaction(sender=b"alice@example.org", rcpt=b"bob@example.org")))
        reply = s.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertTrue(reply.startswith(b"451 4.7.1 Daily sending limit of 1 messages"), reply)

    def test_metricsAcceptedRefusedSessions(self) -> None:
        """The session counts accepted messages by listener, refusals by reason, open sessions."""
        from mailstack.metrics import Metrics

        metrics = Metrics()
        rt = fake_runtime(make_config(), metrics=metrics)
        s = Session("smtp", rt)
        s.talk(b"EHLO c")
        self.assertIn(b"Ok: queued", s.send(transaction(sender=b"x@remote.test", rcpt=b"bob@example.org")))
        text = metrics.exposition().decode()
        self.assertIn('mailstack_messages_accepted_total{listener="smtp"} 1.0', text)
        self.assertIn('mailstack_sessions_open{protocol="smtp"} 1.0', text)
        s.proto.connectionLost(None)
        self.assertIn('mailstack_sessions_open{protocol="smtp"} 0.0', metrics.exposition().decode())

    def test_noPasswordsInLogs(self) -> None:
        """Neither the password nor the AUTH payload appears in any log event."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        token = plain(b"alice@example.org", b"wrongpass")
        with capturedLogs() as events:
            s.send(b"AUTH PLAIN " + token + b"\r\n")
            s.clock.advance(5)
            s.send(b"AUTH LOGIN\r\n" + B64(b"alice@example.org") + b"\r\n" + B64(b"wrongpass") + b"\r\n")
            s.clock.advance(5)
            s.proto.connectionLost(None)
        text = repr(events)
        self.assertNotIn("wrongpass", text)
        self.assertNotIn(token.decode(), text)
        self.assertNotIn(B64(b"wrongpass").decode(), text)
        self.assertTrue(any(e.get("user", None) == "" and "errors" in e for e in events))


class LimitTests(SynchronousTestCase):
    def test_lineTooLong(self) -> None:
        """An overlong command line: 500 5.5.6, the rest of it discarded, next command fine."""
        s = Session(runtime=make_runtime(smtp={"max_line_length": 512}))
        out = s.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
        self.assertEqual(out, b"500 5.5.6 Line too long\r\n250 2.0.0 Ok\r\n")

    def test_lineTooLongAcrossReads(self) -> None:
        """An overlong line arriving in pieces with no CRLF yet: one 500 5.5.6, sync kept."""
        s = Session(runtime=make_runtime(smtp={"max_line_length": 512}))
        out = s.send(b"MAIL FROM:<" + b"x" * 400)
        out += s.send(b"y" * 400)
        out += s.send(b"z" * 400 + b"\r")
        out += s.send(b"\nNOOP\r\n")
        self.assertEqual(out, b"500 5.5.6 Line too long\r\n250 2.0.0 Ok\r\n")

    def test_bareLFInCommand(self) -> None:
        """A command line containing a bare LF is refused, not split into two commands."""
        s = Session()
        out = s.send(b"NOOP\nNOOP\r\n")
        self.assertEqual(out[:9], b"500 5.5.2")
        self.assertEqual(out.count(b"\r\n"), 1)

    def test_tooManyErrors(self) -> None:
        """max_errors errors: the last one is followed by 421 4.7.0 and the connection closes."""
        s = Session(runtime=make_runtime(smtp={"max_errors": 3}))
        out = s.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
        self.assertEqual(
            out.split(b"\r\n")[:-1],
            [
                b"500 5.5.2 Command not recognized",
                b"500 5.5.2 Command not recognized",
                b"500 5.5.2 Command not recognized",
                b"421 4.7.0 Too many errors, closing connection",
            ],
        )
        self.assertTrue(s.closed)

    def test_authFailuresCountAsErrors(self) -> None:
        """Repeated AUTH failures end in 421 4.7.0."""
        s = Session("submissions", make_runtime(smtp={"max_errors": 2}))
        s.talk(b"EHLO c")
        s.send(b"AUTH PLAIN " + plain(b"alice@example.org", b"x") + b"\r\n")
        s.clock.advance(5)
        s.send(b"AUTH PLAIN " + plain(b"alice@example.org", b"y") + b"\r\n")
        s.clock.advance(5)
        self.assertTrue(s.take().endswith(b"421 4.7.0 Too many errors, closing connection\r\n"))
        self.assertTrue(s.closed)

    def test_idleTimeout(self) -> None:
        """No command for command_timeout: 421 4.4.2 and close."""
        s = Session(runtime=make_runtime(smtp={"command_timeout": "30s"}))
        s.clock.advance(29)
        s.talk(b"NOOP")
        s.clock.advance(29)
        self.assertFalse(s.closed)
        s.clock.advance(1)
        self.assertEqual(s.take(), b"421 4.4.2 Timeout exceeded, closing connection\r\n")
        self.assertTrue(s.closed)

    def test_dataTimeout(self) -> None:
        """Inside DATA the data_timeout applies; on expiry the message is aborted."""
        s = Session(runtime=make_runtime(smtp={"command_timeout": "30s", "data_timeout": "100s"}))
        s.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nsome")
        s.clock.advance(99)
        self.assertFalse(s.closed)
        s.clock.advance(1)
        self.assertIn(b"421 4.4.2", s.take())
        self.assertTrue(s.intake.begun[0].aborted)

    def test_noTimeoutWhileCommitting(self) -> None:
        """A slow commit is not the client's fault: no timeout while waiting on it."""
        s = Session(runtime=make_runtime(smtp={"command_timeout": "30s"}))
        s.intake.manual = True
        s.send(b"EHLO c\r\n" + transaction())
        s.clock.advance(100)
        self.assertFalse(s.closed)
        s.intake.begun[0].commit("Q")
        self.assertIn(b"queued as Q", s.take())

    def test_connectionCaps(self) -> None:
        """Per-IP and total caps: 421 4.7.0 at connect; freed slots are reusable."""
        rt = make_runtime(smtp={"max_connections": 3, "max_connections_per_ip": 2})
        f = make_factory("smtp", rt)
        a1 = Session(runtime=rt, factory=f, peer="192.0.2.1")
        Session(runtime=rt, factory=f, peer="192.0.2.1")
        third = Session(runtime=rt, factory=f, peer="192.0.2.1")
        self.assertEqual(third.banner, b"421 4.7.0 Too many connections from your address, try again later\r\n")
        self.assertTrue(third.closed)
        Session(runtime=rt, factory=f, peer="192.0.2.2")
        full = Session(runtime=rt, factory=f, peer="192.0.2.3")
        self.assertEqual(full.banner[:9], b"421 4.7.0")
        a1.proto.connectionLost(None)
        again = Session(runtime=rt, factory=f, peer="192.0.2.3")
        self.assertEqual(again.banner[:3], b"220")

    def test_submissionCapsApart(self) -> None:
        """A full MX listener does not refuse submission users: submission and submissions
        have their own caps (submission.max_connections*), shared by the two of them."""
        rt = make_runtime(smtp={"max_connections": 1}, submission={"max_connections": 2, "max_connections_per_ip": 1})
        Session(runtime=rt, peer="192.0.2.1")
        self.assertEqual(Session(runtime=rt, peer="192.0.2.2").banner[:9], b"421 4.7.0")
        self.assertEqual(Session("submission", rt, peer="192.0.2.3").banner[:3], b"220")
        per_ip = Session("submissions", rt, peer="192.0.2.3")
        self.assertEqual(per_ip.banner, b"421 4.7.0 Too many connections from your address, try again later\r\n")
        self.assertEqual(Session("submissions", rt, peer="192.0.2.4").banner[:3], b"220")
        self.assertEqual(
            Session("submission", rt, peer="192.0.2.5").banner, b"421 4.7.0 Too many connections, try again later\r\n"
        )


class ShutdownTests(SynchronousTestCase):
    def test_drainIdleSessions(self) -> None:
        """drain(): idle sessions get 421 4.3.2 at once; the Deferred fires when they are gone."""
        rt = make_runtime()
        f = make_factory("smtp", rt)
        s = Session(runtime=rt, factory=f)
        d = f.drain(10)
        self.assertEqual(s.take(), b"421 4.3.2 Service shutting down, try again later\r\n")
        self.assertNoResult(d)
        s.proto.connectionLost(None)
        self.successResultOf(d)
        self.assertEqual(rt.reactor.getDelayedCalls(), [])

    def test_drainLetsTransactionFinish(self) -> None:
        """A transaction in flight finishes (250 after commit), then 421 4.3.2; new connections refused."""
        rt = make_runtime()
        rt.intake.manual = True
        f = make_factory("smtp", rt)
        s = Session(runtime=rt, factory=f)
        s.send(b"EHLO c\r\n" + transaction())
        d = f.drain(10)
        self.assertEqual(s.take(), b"")
        late = Session(runtime=rt, factory=f)
        self.assertEqual(late.banner[:9], b"421 4.3.2")
        rt.intake.begun[0].commit("Q9")
        self.assertEqual(
            s.take(), b"250 2.0.0 Ok: queued as Q9\r\n421 4.3.2 Service shutting down, try again later\r\n"
        )
        s.proto.connectionLost(None)
        self.successResultOf(d)

    def test_drainTimeout(self) -> None:
        """After the grace period remaining sessions are dropped and the Deferred fires."""
        rt = make_runtime()
        f = make_factory("smtp", rt)
        s = Session(runtime=rt, factory=f)
        s.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\npartial")
        d = f.drain(10)
        self.assertNoResult(d)
        rt.reactor.advance(10)
        self.successResultOf(d)
        self.assertTrue(s.closed)
        self.assertTrue(rt.intake.begun[0].aborted)

    def test_factoryType(self) -> None:
        """make_factory returns an SMTPFactory of the requested kind; unknown kinds fail."""
        rt = make_runtime()
        self.assertIsInstance(make_factory("submission", rt), SMTPFactory)
        self.assertRaises(ValueError, make_factory, "lmtp", rt)


class FakesTests(SynchronousTestCase):
    def test_fakesProvideInterfaces(self) -> None:
        """The test fakes implement the interfaces the real parts do (so the tests mean something)."""
        intake = FakeIntake()
        self.assertTrue(verifyObject(IIntake, intake))
        self.assertTrue(verifyObject(IIncoming, FakeIncoming(intake, None)))
        self.assertTrue(verifyObject(IRouter, FakeRouter()))
        self.assertTrue(verifyObject(ILoginThrottle, FakeThrottle()))
        self.assertTrue(verifyObject(ICredentialsChecker, FakeChecker()))


class RobustnessTests(SynchronousTestCase):
    def test_nonAsciiAuthResponse(self) -> None:
        """8-bit bytes in an AUTH initial response: 501 5.5.2, session goes on."""
        s = Session("submissions")
        s.talk(b"EHLO c")
        self.assertEqual(s.codes(b"AUTH PLAIN \xff\xfe", b"NOOP"), [b"501 5.5.2", b"250 2.0.0"])

    def test_ehloControlOr8bitRefused(self) -> None:
        """An EHLO name with control or 8-bit bytes is 501 5.5.4 (it would be echoed and go into Received:)."""
        s = Session()
        self.assertEqual(s.codes(b"EHLO \xffevil", b"EHLO evil\x07", b"HELO \x1b[31m"), [b"501 5.5.4"] * 3)

    def test_routerCrash(self) -> None:
        """An unexpected exception in the router: 451 4.3.0 without its text; the session continues."""
        s = Session()
        s.runtime.router.resolve = lambda a, auth: 1 / 0
        s.talk(b"EHLO c", b"MAIL FROM:<x@remote.test>")
        self.assertEqual(
            s.talk(b"RCPT TO:<alice@example.org>"), [b"451 4.3.0 Local error in processing, try again later"]
        )
        self.assertEqual(s.codes(b"NOOP"), [b"250 2.0.0"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_asyncRouterKeepsOrder(self) -> None:
        """A router answering with a Deferred: the RCPT reply waits for it, and
        commands pipelined behind it are answered only after it (RFC 2920 section 3)."""
        s = Session()
        pending: list[Deferred] = []
        sync_resolve = s.runtime.router.resolve

        def resolve(address: Address, authenticated: bool) -> Deferred:
            d: Deferred = Deferred()
            pending.append(d)
            d.addCallback(lambda _: sync_resolve(address, authenticated))
            return d

        s.runtime.router.resolve = resolve
        s.talk(b"EHLO c", b"MAIL FROM:<x@remote.test>")
        self.assertEqual(s.send(b"RCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\nNOOP\r\n"), b"")
        pending.pop(0).callback(None)
        self.assertEqual(s.take(), b"250 2.1.5 Recipient ok\r\n")
        pending.pop(0).callback(None)
        self.assertEqual(s.take(), b"550 5.1.1 No such user here\r\n250 2.0.0 Ok\r\n")

    def test_intakeBeginCrash(self) -> None:
        """intake.begin raising: 451 4.3.0 to DATA, and the would-be content is not run as commands... but
        a conforming client waits for 354, so the next line is a command again."""
        s = Session()
        s.runtime.intake.begin = lambda env: 1 / 0
        s.talk(b"EHLO c", b"MAIL FROM:<x@remote.test>", b"RCPT TO:<alice@example.org>")
        self.assertEqual(s.codes(b"DATA", b"NOOP"), [b"451 4.3.0", b"250 2.0.0"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_commandHandlerBug(self) -> None:
        """A bug inside a command handler gives 451 4.3.0 and is logged, not a dropped connection."""
        s = Session()
        s.proto.policy = None  # EHLO's extension list now fails
        self.assertEqual(s.codes(b"EHLO c"), [b"451 4.3.0"])
        self.assertFalse(s.closed)
        self.flushLoggedErrors(AttributeError)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class SplitPropertyTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(
        body=st.lists(st.sampled_from([b".", b"..", b"a", b"\r\n", b"\r\n.", b"\r\n..x", b"\xff", b" "]), max_size=30),
        cuts=st.lists(st.integers(min_value=1, max_value=13), min_size=1, max_size=6),
    )
    def test_readSplitsDoNotMatter(self, body, cuts) -> None:
        """However a pipelined session is split into reads, the replies and the stored message are the same."""
        content = b"".join(body)
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        stuffed = (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:]
        data = b"EHLO c\r\n" + transaction(body=stuffed) + b"NOOP\r\nQUIT\r\n"
        whole = Session()
        expected = whole.send(data)
        split = Session()
        out = b""
        pos = i = 0
        while pos < len(data):
            n = cuts[i % len(cuts)]
            out += split.send(data[pos : pos + n])
            pos += n
            i += 1
        self.assertEqual(out, expected)
        self.assertEqual([m.data for m in split.intake.committed], [m.data for m in whole.intake.committed])
        self.assertEqual(whole.intake.committed[0].data, content)


class TLSHandshakeBackPressureTests(SynchronousTestCase):
    def test_pauseDuringHandshakeDoesNotStopReading(self) -> None:
        """Twisted's TLS layer pauses its producer while it buffers our writes before the handshake;
        that must not make the session stop reading (the handshake needs the reads).  After the first
        application data, a full write buffer pauses reading again."""
        from .support import ImplicitTLSTransport

        class HandshakingTransport(ImplicitTLSTransport):
            def write(self, data: bytes) -> None:
                super().write(data)
                if self.producer is not None:
                    self.producer.pauseProducing()  # buffered until the handshake completes

        transport = HandshakingTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        session = Session(kind="submissions", transport=transport)
        self.assertIs(transport.producer, session.proto)
        self.assertEqual(transport.producerState, "producing")
        session.proto.resumeProducing()
        session.send(b"EHLO client.test\r\n")
        self.assertEqual(transport.producerState, "paused")  # now a real full buffer

    def test_startTLSHandshakeDoesNotStopReading(self) -> None:
        """The same after STARTTLS on the submission listener."""
        session = Session(kind="submission")
        session.send(b"EHLO client.test\r\n")
        session.send(b"STARTTLS\r\n")
        session.proto.pauseProducing()
        self.assertEqual(session.transport.producerState, "producing")


class DrainWaitsForIntakeTests(SynchronousTestCase):
    def test_drainWaitsForInlineDeliveries(self) -> None:
        """After the sessions are gone, drain() also waits for the intake's commits in flight (bounded by the grace)."""
        from twisted.internet.defer import Deferred

        rt = make_runtime()
        idle: list[Deferred] = []
        rt.intake.wait_idle = lambda: idle.append(Deferred()) or idle[-1]
        f = make_factory("smtp", rt)
        d = f.drain(10)
        self.assertNoResult(d)
        idle[0].callback(None)
        self.successResultOf(d)
        self.assertEqual(rt.reactor.getDelayedCalls(), [])

    def test_drainIntakeWaitBounded(self) -> None:
        """An intake commit that never ends does not hold shutdown beyond the grace period."""
        from twisted.internet.defer import Deferred

        rt = make_runtime()
        rt.intake.wait_idle = Deferred
        f = make_factory("smtp", rt)
        d = f.drain(10)
        self.assertNoResult(d)
        rt.reactor.advance(10)
        self.successResultOf(d)
