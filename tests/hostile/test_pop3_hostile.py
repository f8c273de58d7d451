"""Hostile input against the POP3 protocol (pop3/server.py) over StringTransport.

Random bytes, pipelined garbage, overlong lines, NULs, bare CR/LF, unicode in
USER/PASS/AUTH and message numbers, in both states.  Every test checks that
each response is ``+OK``/``-ERR`` (or a well-formed multi-line body or SASL
continuation), that no exception escapes or is logged, that no traceback text
reaches the client, that the session stays in step (a login, STAT, RETR and
QUIT work afterwards), and that garbage never deletes mail.
"""

from __future__ import annotations

import base64
import os
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.pop3.factory import make_factory
from tests.hostile.support import FAST, LEAKS, POP3_STATUS, SLOW, LogFailures
from tests.pop3.support import make_runtime, temp_dir, write_message
from tests.support.transports import ImplicitTLSTransport

# Each example builds a fresh Maildir on disk: fewer examples than the in-memory SMTP tests.
FAST = settings(FAST, max_examples=35)

MSG1 = b"Subject: one\r\n\r\nfirst\r\n.dot line\r\n"
MSG2 = b"Subject: two\r\n\r\nsecond\r\n"

_MULTI = re.compile(
    rb"\+OK (Capability list follows|Supported SASL mechanisms follow|Unique-ID listing follows|"
    rb"Top of message follows|\d+ messages \(\d+ octets\)|\d+ octets)\Z"
)

VERBS = [
    b"USER",
    b"PASS",
    b"AUTH",
    b"AUTH PLAIN",
    b"CAPA",
    b"STAT",
    b"LIST",
    b"UIDL",
    b"RETR",
    b"TOP",
    b"DELE",
    b"RSET",
    b"NOOP",
    b"APOP",
    b"XTND",
    b"retr",
    b"top",
]
fragment = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.sampled_from(
        [
            b"\x00",
            b"\r",
            b"\n",
            b" ",
            b"-1",
            b"0",
            b"1",
            b"2",
            b"99999999999",
            b"\xff",
            b"1 0",
            b"1 -5",
            b"1 99999999999999",
        ]
    ),
    st.sampled_from(VERBS),
)
hostile_line = st.lists(fragment, max_size=6).map(b"".join)


def pop3_responses(out: bytes) -> list[bytes]:
    """The status lines of ``out``; asserts the grammar of every line and multi-line block."""
    for leak in LEAKS:
        assert leak not in out, f"{leak!r} leaked: {out[-300:]!r}"
    assert out == b"" or out.endswith(b"\r\n"), out[-200:]
    statuses: list[bytes] = []
    lines = out.split(b"\r\n")[:-1]
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line == b"+ ":
            statuses.append(line)  # SASL continuation (RFC 5034)
            continue
        assert POP3_STATUS.match(line), f"bad POP3 status line {line!r}"
        statuses.append(line)
        if _MULTI.match(line):
            while True:
                assert i < len(lines), f"unterminated multi-line response after {line!r}"
                body = lines[i]
                i += 1
                if body == b".":
                    break
    return statuses


class Pop3Hostile(SynchronousTestCase):
    def setUp(self) -> None:
        self.fresh()

    def fresh(self) -> None:
        """A new runtime and a mailbox with two messages (hypothesis examples share one test instance)."""
        self.root = temp_dir(self)
        self.rt = make_runtime(self.root)
        self.maildir = os.path.join(self.root, "mail", "localhost", "alice")
        write_message(self.maildir, MSG1)
        write_message(self.maildir, MSG2)

    def files(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.maildir, "new")) + os.listdir(os.path.join(self.maildir, "cur")))

    def connect(self):
        proto = make_factory("pop3s", self.rt).buildProtocol(None)
        proto.makeConnection(ImplicitTLSTransport())
        proto.transport.clear()
        self.addCleanup(self.lose, proto)
        return proto

    def lose(self, proto) -> None:
        """What the reactor does after loseConnection or a drop."""
        if not proto._lost:
            proto.connectionLost()

    def feed(self, proto, data: bytes) -> bytes:
        proto.transport.clear()
        proto.dataReceived(data)
        self.rt.reactor.advance(0)
        return proto.transport.value()

    def resync(self, proto) -> bytes:
        if proto._closed:
            return b""
        out = self.feed(proto, b"\r\n")
        if proto._sasl_pending:
            out += self.feed(proto, b"*\r\n")
        return out

    def login(self, proto) -> None:
        statuses = pop3_responses(self.feed(proto, b"USER alice@localhost\r\nPASS secret\r\n"))
        self.assertEqual([s[:3] for s in statuses], [b"+OK", b"+OK"], statuses)

    def normal_session(self, proto, expect: int = 2) -> None:
        """Login, STAT, RETR 1 byte-exact, QUIT: the session was in step."""
        if proto.state == "AUTHORIZATION":
            self.login(proto)
        self.feed(proto, b"RSET\r\n")
        out = self.feed(proto, b"STAT\r\nRETR 1\r\n")
        self.assertTrue(out.startswith(b"+OK %d " % expect), out)
        self.assertTrue(out.endswith((b"Subject: one\r\n\r\nfirst\r\n..dot line\r\n.\r\n", MSG2 + b".\r\n")), out)
        pop3_responses(out)
        self.assertTrue(self.feed(proto, b"QUIT\r\n").startswith(b"+OK"))

    @FAST
    @given(data=st.binary(max_size=3000))
    def test_randomBytesBeforeLogin(self, data: bytes) -> None:
        """Random bytes in AUTHORIZATION: well-formed responses, no logged failure, login works after."""
        self.fresh()
        with LogFailures() as failures:
            p = self.connect()
            pop3_responses(self.feed(p, data))
            pop3_responses(self.resync(p))
            if not p._closed:
                self.normal_session(p)
        self.assertEqual(failures.events, [], failures.describe())
        self.assertEqual(len(self.files()), 2)

    @FAST
    @given(lines=st.lists(hostile_line, max_size=25))
    def test_pipelinedGarbageLoggedIn(self, lines: list[bytes]) -> None:
        """Hostile commands in TRANSACTION (bad numbers, unicode, NULs): well-formed responses;
        dropping the connection afterwards deletes nothing (no QUIT, no UPDATE)."""
        self.fresh()
        lines = [line for line in lines if b"QUIT" not in line.upper()]
        with LogFailures() as failures:
            p = self.connect()
            self.login(p)
            out = self.feed(p, b"".join(line + b"\r\n" for line in lines))
            pop3_responses(out)
            pop3_responses(self.resync(p))
            self.lose(p)
        self.assertEqual(failures.events, [], failures.describe())
        self.assertEqual(len(self.files()), 2)
        q = self.connect()
        self.normal_session(q)

    @FAST
    @given(line=hostile_line)
    def test_oneResponsePerLine(self, line: bytes) -> None:
        """Any single line that is not AUTH, QUIT or STLS gets exactly one response, in either state."""
        line = line.replace(b"\r", b"").replace(b"\n", b"")
        if any(v in line.upper() for v in (b"AUTH", b"QUIT", b"STLS")):
            line = b"X" + line[:50]
        for logged_in in (False, True):
            self.fresh()
            p = self.connect()
            if logged_in:
                self.login(p)
            self.assertEqual(len(pop3_responses(self.feed(p, line + b"\r\n"))), 1, line)
            self.normal_session(p)

    @SLOW
    @given(lines=st.lists(hostile_line, max_size=12), cuts=st.lists(st.integers(0, 3000), max_size=10))
    def test_outputIndependentOfSegmentation(self, lines: list[bytes], cuts: list[int]) -> None:
        """Login plus hostile lines give the same output in one read as in arbitrary pieces."""
        data = b"USER alice@localhost\r\nPASS secret\r\n" + b"".join(
            line + b"\r\n" for line in lines if b"QUIT" not in line.upper()
        )
        self.fresh()
        a = self.connect()
        expected = self.feed(a, data)
        self.lose(a)
        b = self.connect()
        got = b""
        last = 0
        for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
            got += self.feed(b, data[last:cut])
            last = cut
        self.lose(b)
        self.assertEqual(got, expected)

    def test_overlongLines(self) -> None:
        """100 kB lines, with and without LF, before and after login: one -ERR each, then in step."""
        p = self.connect()
        out = self.feed(p, b"USER " + b"a" * 100_000 + b"\r\nNOOP\r\n")
        self.assertEqual([s[:4] for s in pop3_responses(out)], [b"-ERR", b"-ERR"])  # NOOP is not valid yet
        out = self.feed(p, b"AUTH PLAIN " + b"A" * 60_000)
        out += self.feed(p, b"A" * 60_000 + b"\r\nCAPA\r\n")
        self.assertEqual([s[:4] for s in pop3_responses(out)], [b"-ERR", b"+OK "])
        self.login(p)
        out = self.feed(p, b"LIST " + b"9" * 5000 + b"\r\nSTAT\r\n")
        self.assertEqual([s[:4] for s in pop3_responses(out)], [b"-ERR", b"+OK "])
        self.normal_session(p)

    def test_numbersAndNulsInArguments(self) -> None:
        """Message numbers that are huge, negative, zero, unicode digits or carry NULs: -ERR, nothing deleted."""
        p = self.connect()
        self.login(p)
        stat = self.feed(p, b"STAT\r\n")
        args = ["0", "-1", "3", "99999999999999999999", "١", "²", "1\x00", "1 ", " 1", "0x1", "+1", "1e3", "1.0"]
        out = b""
        for a in args:
            for verb in ("RETR", "DELE", "LIST", "UIDL", "TOP"):
                out += self.feed(p, f"{verb} {a}\r\n".encode())
            out += self.feed(p, f"TOP 1 {a}\r\n".encode())
        statuses = pop3_responses(out)
        self.assertTrue(all(s.startswith(b"-ERR") or s.startswith(b"+OK") for s in statuses))
        self.assertEqual(self.feed(p, b"STAT\r\n"), stat)
        self.assertTrue(self.feed(p, b"QUIT\r\n").startswith(b"+OK"))
        self.assertEqual(len(self.files()), 2)

    def test_authGarbage(self) -> None:
        """AUTH PLAIN with bad base64, missing NULs, unicode and huge names: -ERR each, then a login works."""
        p = self.connect()
        out = b""
        for line in [
            b"AUTH PLAIN !!!",
            b"AUTH PLAIN " + base64.b64encode(b"\0\0\0\0"),
            b"AUTH PLAIN " + base64.b64encode("\0jörg\0pä\x00ss".encode()),
            b"AUTH PLAIN",
            b"\xff\xfe",
            b"AUTH PLAIN",
            b"=",
            b"AUTH PLAIN " + base64.b64encode(b"\0" + b"x" * 1400 + b"\0pw"),
            b"USER \xff\xfe\x00",
            b"PASS \x00",
            "USER jörg@exämple.test".encode(),
            b"PASS x",
        ]:
            out += self.feed(p, line + b"\r\n")
        pop3_responses(out)
        self.assertEqual(p.state, "AUTHORIZATION")
        pop3_responses(self.resync(p))
        self.normal_session(p)
