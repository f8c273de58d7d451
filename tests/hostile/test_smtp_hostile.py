"""Hostile input against the ESMTP server protocol (smtp/server.py) over StringTransport.

Property tests (hypothesis, derandomized, small example counts) and fixed
vectors: random bytes, overlong lines, NULs, bare CR/LF, unicode in every
field, thousands of RCPTs, pipelined garbage.  Every test checks the RFC 5321
reply grammar (and RFC 3463 codes), that no exception escapes or is logged,
that nothing resembling a traceback reaches the client, and that a normal
transaction still works afterwards (the session is in sync).
"""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.hostile.support import FAST, SLOW, LogFailures, check_smtp_output
from tests.smtp.data_reference import SMUGGLING
from tests.smtp.support import Session, make_runtime
from tests.support.fakes import FakeThrottle

MESSAGE = b"Subject: ok\r\n\r\nnormal body\r\n"

# Command words the fuzzer mixes with garbage; STARTTLS is left to the TLS transport tests.
VERBS = [
    b"EHLO",
    b"HELO",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY",
    b"EXPN",
    b"HELP",
    b"AUTH",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"QUIT",
    b"mail from:",
    b"rcpt to:",
    b"BDAT",
    b"ETRN",
]

garbage_bytes = st.binary(max_size=300)
hostile_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80).map(
    lambda t: t.encode("utf-8")
)
specials = st.sampled_from(
    [
        b"\x00",
        b"\r",
        b"\n",
        b"\r\r\n",
        b"\n\r",
        b"<",
        b">",
        b"@",
        b'"',
        b"\\",
        b" ",
        b"\xff",
        b"\xc3\xa9",
        b"%",
        b"!",
        b":",
        b",",
        b".",
        b"<>",
        b"=",
        b"*",
    ]
)
fragment = st.one_of(garbage_bytes, hostile_text, specials, st.sampled_from(VERBS))
hostile_line = st.lists(fragment, max_size=8).map(b"".join)


def new_session(max_errors: int = 0, plain: bool = False, peer: str = "192.0.2.7", **sections) -> Session:
    """An MX session with a synchronous fake intake; error cap off unless given."""
    smtp = {"max_errors": max_errors}
    smtp.update(sections.pop("smtp", {}))
    rt = make_runtime(smtp=smtp, **sections)
    rt.throttle = FakeThrottle(delay=0.0)
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000)) if plain else None
    return Session("smtp", rt, peer=peer, transport=transport)


def feed(s: Session, data: bytes) -> bytes:
    """Feed one read, run due timers (throttle delays), return the output."""
    s.transport.clear()
    s.proto.dataReceived(data)
    s.clock.advance(0)
    return s.take()


def resync(s: Session) -> bytes:
    """Finish whatever half-command or mode the garbage left, the way a client would."""
    out = b""
    if s.closed:
        return out
    out += feed(s, b"\r\n")
    for _ in range(4):
        if s.closed:
            break
        if s.proto.mode == "data":
            out += feed(s, b"\r\n.\r\n")
        elif s.proto.mode == "auth":
            out += feed(s, b"*\r\n")
        else:
            break
    return out


def normal_transaction(case: SynchronousTestCase, s: Session, sender: bytes = b"x@client.test") -> None:
    """EHLO/MAIL/RCPT/DATA for alice: every step accepted, message committed byte-exact."""
    before = len(s.intake.committed)
    out = feed(s, b"RSET\r\nEHLO client.test\r\nMAIL FROM:<" + sender + b">\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    replies = check_smtp_output(out)
    codes = [r[-1][:3] for r in replies]
    case.assertEqual(codes, [b"250", b"250", b"250", b"250", b"354"], out)
    out = feed(s, MESSAGE + b".\r\n")
    case.assertTrue(out.startswith(b"250 2.0.0 Ok: queued as "), out)
    case.assertEqual(len(s.intake.committed), before + 1)
    case.assertEqual(s.intake.committed[-1].data, MESSAGE)


class RandomInputTests(SynchronousTestCase):
    @FAST
    @given(data=st.binary(max_size=4000))
    def test_randomBytes(self, data: bytes) -> None:
        """Random bytes in one read: grammatical replies, nothing logged as a failure, still in sync."""
        with LogFailures() as failures:
            s = new_session()
            out = feed(s, data)
            check_smtp_output(out)
            check_smtp_output(resync(s))
            if not s.closed:
                normal_transaction(self, s)
        self.assertEqual(failures.events, [], failures.describe())

    @FAST
    @given(lines=st.lists(hostile_line, max_size=25))
    def test_pipelinedGarbage(self, lines: list[bytes]) -> None:
        """Pipelined hostile command lines (unicode, NUL, bare CR/LF, verbs with junk): RFC replies, in sync."""
        with LogFailures() as failures:
            s = new_session()
            out = feed(s, b"".join(line + b"\r\n" for line in lines))
            check_smtp_output(out)
            check_smtp_output(resync(s))
            if not s.closed:
                normal_transaction(self, s)
        self.assertEqual(failures.events, [], failures.describe())

    @SLOW
    @given(lines=st.lists(hostile_line, max_size=15), cuts=st.lists(st.integers(0, 5000), max_size=12))
    def test_outputIndependentOfSegmentation(self, lines: list[bytes], cuts: list[int]) -> None:
        """The same input split into arbitrary reads gives byte-identical output (no desync by TCP segmentation)."""
        data = b"".join(line + b"\r\n" for line in lines)
        whole = new_session(plain=True)
        expected = feed(whole, data)
        pieces = new_session(plain=True)
        got = b""
        last = 0
        for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
            got += feed(pieces, data[last:cut])
            last = cut
        self.assertEqual(got, expected)
        self.assertEqual([i.data for i in pieces.intake.committed], [i.data for i in whole.intake.committed])

    @FAST
    @given(line=hostile_line)
    def test_oneReplyPerLine(self, line: bytes) -> None:
        """Any single line without a mode-changing verb gets exactly one reply."""
        while b"\r\n" in line:  # bare CR and LF stay: they are inside the one line
            line = line.replace(b"\r\n", b"")
        if any(v in line.upper() for v in (b"DATA", b"AUTH", b"QUIT", b"STARTTLS")) or len(line) > 4000:
            line = b"X" + line.replace(b"\r", b"").replace(b"\n", b"")[:100]
        s = new_session()
        feed(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        replies = check_smtp_output(feed(s, line + b"\r\n"))
        self.assertEqual(len(replies), 1, replies)
        normal_transaction(self, s)


class FixedVectorTests(SynchronousTestCase):
    def test_overlongCommandLines(self) -> None:
        """100 kB lines (with and without CRLF, bytewise too) get 500 5.5.6 once each; the next command works."""
        s = new_session()
        out = feed(s, b"NOOP " + b"A" * 100_000 + b"\r\nNOOP\r\n")
        self.assertEqual([r[-1][:9] for r in check_smtp_output(out)], [b"500 5.5.6", b"250 2.0.0"])
        out = feed(s, b"MAIL FROM:<" + b"a" * 50_000)
        out += feed(s, b"b" * 50_000 + b">\r\nNOOP\r\n")
        self.assertEqual([r[-1][:9] for r in check_smtp_output(out)], [b"500 5.5.6", b"250 2.0.0"])
        out = s.send_bytewise(b"HELO " + b"h" * 5000 + b"\r\nNOOP\r\n")
        self.assertEqual([r[-1][:9] for r in check_smtp_output(out)], [b"500 5.5.6", b"250 2.0.0"])
        normal_transaction(self, s)

    def test_nulAndBareNewlinesInCommands(self) -> None:
        """NUL, bare CR and bare LF inside command lines: 500 5.5.2 / 501 5.5.4 (NUL in EHLO), never a second
        command."""
        s = new_session()
        out = feed(s, b"NOOP\nMAIL FROM:<evil@x>\r\nEHLO a\x00b\r\nRSET\rMAIL FROM:<evil@x>\r\n")
        replies = check_smtp_output(out)
        self.assertEqual([r[-1][:3] for r in replies], [b"500", b"501", b"500"])
        self.assertIsNone(s.proto.sender)
        normal_transaction(self, s)

    def test_unicodeInEveryField(self) -> None:
        """Non-ASCII in EHLO, MAIL, RCPT, AUTH and VRFY: syntax errors (553 5.6.7 for a UTF-8 path
        without SMTPUTF8, RFC 6531 section 3.3) or 2xx, replies pure ASCII."""
        s = new_session()
        lines = [
            "EHLO exämple.test",
            "EHLO client.test",
            "MAIL FROM:<jörg@exämple.test>",
            "MAIL FROM:<x@b.test> BODY=8BİTMIME",
            "MAIL FROM:<x@b.test>",
            "RCPT TO:<álice@example.org>",
            "RCPT TO:<alice@exámple.org>",
            "RCPT TO:<\u202ealice@example.org>",
            "VRFY ünïcode",
            "AUTH PLAIN ☃",
            "HELO 🐍",
        ]
        out = feed(s, "".join(line + "\r\n" for line in lines).encode("utf-8"))
        replies = check_smtp_output(out)
        self.assertTrue(out.isascii(), out)
        codes = [r[-1][:9] for r in replies]
        self.assertEqual(codes[0], b"501 5.5.4")
        self.assertEqual(
            codes[2:9],
            [b"553 5.6.7", b"501 5.5.4", b"250 2.1.0", b"553 5.6.7", b"553 5.6.7", b"553 5.6.7", b"252 2.5.0"],
        )
        normal_transaction(self, s)

    def test_thousandsOfRecipients(self) -> None:
        """3000 pipelined RCPTs: the first max_recipients get 250, the rest 452 4.5.3; DATA then
        delivers to those accepted (RFC 5321 4.5.3.1.10), the session is not dropped."""
        s = new_session(max_errors=10)
        rcpts = b"".join(b"RCPT TO:<alice@example.org>\r\n" for _ in range(3000))
        out = feed(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + rcpts + b"DATA\r\n" + MESSAGE + b".\r\n")
        codes = [r[-1][:9] for r in check_smtp_output(out)]
        self.assertEqual(codes[1], b"250 2.1.0")
        self.assertEqual(codes[2:102], [b"250 2.1.5"] * 100)
        self.assertEqual(codes[102:3002], [b"452 4.5.3"] * 2900)
        self.assertEqual([c[:3] for c in codes[3002:]], [b"354", b"250"])
        self.assertEqual(s.intake.committed[-1].data, MESSAGE)
        self.assertFalse(s.closed)

    def test_manyDistinctRecipientsBounded(self) -> None:
        """5000 distinct unknown recipients pipelined: every one answered 550 5.1.1, none kept in memory."""
        s = new_session()
        rcpts = b"".join(b"RCPT TO:<u%d@example.org>\r\n" % i for i in range(5000))
        out = feed(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + rcpts)
        codes = [r[-1][:9] for r in check_smtp_output(out)]
        self.assertEqual(codes[2:], [b"550 5.1.1"] * 5000)
        self.assertEqual(s.proto.recipients, [])
        normal_transaction(self, s)

    def test_errorCapDropsSession(self) -> None:
        """max_errors bad commands: the last is followed by 421 4.7.0 and the connection closes."""
        s = new_session(max_errors=10)
        out = feed(s, b"BOGUS\r\n" * 30)
        codes = [r[-1][:9] for r in check_smtp_output(out)]
        self.assertEqual(codes, [b"500 5.5.2"] * 10 + [b"421 4.7.0"])
        self.assertTrue(s.closed)

    def test_smugglingSequencesInData(self) -> None:
        """Each scanner end-of-data sequence (SMTP smuggling lookalikes, see smtp/data.py) followed by
        pipelined commands, in one read and bytewise: at most one message (the real one), or a rejection;
        never a smuggled one."""
        smuggled = (
            b"mail FROM:<smuggled@evil.test>\r\nrcpt TO:<bob@example.org>\r\ndata\r\nSubject: SMUGGLED\r\n\r\nx\r\n"
        )
        for seq in SMUGGLING:
            for bytewise in (False, True):
                s = new_session()
                feed(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
                payload = b"Subject: t\r\n\r\nTESTING" + seq + smuggled + b".\r\n"
                out = s.send_bytewise(payload) if bytewise else feed(s, payload)
                check_smtp_output(out)
                senders = [str(i.envelope.sender) for i in s.intake.committed]
                self.assertNotIn("smuggled@evil.test", senders, (seq, bytewise))
                self.assertLessEqual(len(s.intake.committed), 1, (seq, bytewise))
                for i in s.intake.committed:
                    self.assertNotIn(b"\r\n.\r\n", b"\r\n" + i.data)
                check_smtp_output(resync(s))
                normal_transaction(self, s)

    @FAST
    @given(
        body=st.lists(
            st.one_of(
                st.binary(max_size=200),
                st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"\r\n.", b"\r\n..", b"\x00", b"\r\n.\r"]),
            ),
            max_size=30,
        ).map(b"".join)
    )
    def test_randomMessageBodies(self, body: bytes) -> None:
        """Arbitrary DATA content then the terminator: one reply (250, 550 5.6.0) and the session goes on."""
        s = new_session()
        feed(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        out = feed(s, body + b"\r\n.\r\n")
        replies = check_smtp_output(out)
        # The body may itself contain CRLF.CRLF: then what follows it is commands, answered in order.
        self.assertGreaterEqual(len(replies), 1)
        if b"\r\n.\r\n" not in b"\r\n" + body + b"\r\n":
            self.assertEqual(len(replies), 1)
            self.assertIn(replies[0][-1][:9], (b"250 2.0.0", b"550 5.6.0"))
        check_smtp_output(resync(s))
        normal_transaction(self, s)

    def test_authGarbage(self) -> None:
        """Bad base64, huge and empty SASL responses, NULs and unicode in AUTH: 5xx, then in sync."""
        s = new_session(auth={"plaintext_on_loopback": True}, peer="127.0.0.1")
        out = feed(s, b"EHLO c\r\n")
        for line in [
            b"AUTH PLAIN !!!",
            b"AUTH PLAIN " + base64.b64encode(b"\0\0\0\0"),
            b"AUTH PLAIN " + base64.b64encode("\0jörg\0pä\x00ss".encode()),
            b"AUTH LOGIN",
            b"\xff\xfe",
            b"AUTH LOGIN " + base64.b64encode(b"x" * 2000),
            b"AUTH PLAIN",
            b"=",
            b"AUTH XOAUTH2 abc",
            b"AUTH PLAIN " + b"A" * 5000,
        ]:
            out += feed(s, line + b"\r\n")
        check_smtp_output(out)
        self.assertFalse(s.proto.user)
        check_smtp_output(resync(s))
        normal_transaction(self, s)


class BackPressureTests(SynchronousTestCase):
    def test_stopsReadingWhileWriteBufferFull(self) -> None:
        """The session is the transport's streaming producer: when the transport's write buffer is
        full it stops reading, and reads again once the buffer drains (pipelined floods whose
        replies are never read cannot grow the server's memory)."""
        s = new_session(plain=True)
        self.assertIs(s.transport.producer, s.proto)
        self.assertTrue(s.transport.streaming)
        s.proto.pauseProducing()
        self.assertEqual(s.transport.producerState, "paused")
        s.proto.resumeProducing()
        self.assertEqual(s.transport.producerState, "producing")
        normal_transaction(self, s)

    def test_bothReasonsToPause(self) -> None:
        """Reading resumes only when neither the write buffer is full nor a blocked command has
        too much pipelined input behind it."""
        s = new_session(plain=True)
        s.intake.manual = True
        feed(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        feed(s, b"x\r\n.\r\n" + b"NOOP\r\n" * 50_000)  # the commit is pending: input piles up
        self.assertEqual(s.transport.producerState, "paused")
        s.proto.pauseProducing()
        s.intake.begun[-1].commit()
        s.clock.advance(0)
        self.assertEqual(s.transport.producerState, "paused")  # still full on the write side
        s.proto.resumeProducing()
        self.assertEqual(s.transport.producerState, "producing")
        replies = check_smtp_output(s.take())
        self.assertEqual([r[-1][:3] for r in replies], [b"250"] * 50_001)


class AuthenticatedAndTLSTests(SynchronousTestCase):
    @FAST
    @given(lines=st.lists(hostile_line, max_size=20))
    def test_garbageAfterLoginOnSubmissions(self, lines: list[bytes]) -> None:
        """An authenticated submissions session fed hostile lines: RFC replies, nothing logged as a
        failure, no second AUTH possible, and it can still send as its own address afterwards."""
        with LogFailures() as failures:
            rt = make_runtime(smtp={"max_errors": 0}, limits={"messages_per_hour": 0})
            rt.throttle = FakeThrottle(delay=0.0)
            s = Session("submissions", rt)
            s.login()
            check_smtp_output(feed(s, b"".join(line + b"\r\n" for line in lines)))
            check_smtp_output(resync(s))
            if not s.closed:
                self.assertEqual(s.proto.user, "alice@example.org")
                normal_transaction(self, s, sender=b"alice@example.org")
        self.assertEqual(failures.events, [], failures.describe())

    @FAST
    @given(after=st.lists(hostile_line, max_size=10))
    def test_starttlsDiscardsPipelinedPlaintext(self, after: list[bytes]) -> None:
        """STARTTLS followed by anything pipelined in the same read: only the 220 is answered;
        none of the plaintext is executed (RFC 3207 section 4.2, CVE-2011-0411)."""
        s = new_session()
        feed(s, b"EHLO c\r\n")
        out = feed(s, b"STARTTLS\r\n" + b"".join(line + b"\r\n" for line in after) + b"MAIL FROM:<evil@x.test>\r\n")
        self.assertEqual(out, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIsNone(s.proto.helo)
        self.assertEqual(s.intake.begun, [])
        normal_transaction(self, s)
