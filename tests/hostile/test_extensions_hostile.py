"""Hostile input to the SMTP extensions: BDAT counts, DSN parameters, malformed UTF-8 in paths.

Every reply keeps the RFC 5321 grammar with an enhanced status code, nothing
leaks, and a normal transaction still works afterwards: the session never
loses its place in the byte stream.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.hostile.support import FAST, check_smtp_output
from tests.hostile.test_smtp_hostile import feed, new_session, normal_transaction

TXN = b"EHLO c\r\nMAIL FROM:<x@client.test>\r\nRCPT TO:<alice@example.org>\r\n"


def codes(out: bytes) -> list[bytes]:
    return [r[-1][:9] for r in check_smtp_output(out)]


class BdatCountTests(SynchronousTestCase):
    def test_unreadableCounts(self) -> None:
        """Negative, non-numeric, missing, signed or overlong counts: 501 5.5.4 and nothing consumed
        (the next line is a command again)."""
        for arg in (b"-1", b"x", b"", b"+3", b"1e3", b"3 LAST LAST", b"9" * 21, b"0x10", b"\xff"):
            s = new_session()
            out = feed(s, TXN + b"BDAT " + arg + b"\r\nNOOP\r\n")
            self.assertEqual(codes(out)[-2:], [b"501 5.5.4", b"250 2.0.0"], arg)
            normal_transaction(self, s)

    def test_hugeCount(self) -> None:
        """A count far beyond SIZE is read (and discarded) to its end; 552 5.3.4, then in sync."""
        s = new_session()
        n = 3 * 10000 + 7
        out = feed(s, TXN + b"BDAT %d LAST\r\n" % n)
        self.assertEqual(codes(out)[-1], b"250 2.1.5")  # still reading the chunk
        out = feed(s, b"RSET\r\n" * (n // 6) + b"x" * (n % 6) + b"NOOP\r\n")
        self.assertEqual(codes(out), [b"552 5.3.4", b"250 2.0.0"])
        normal_transaction(self, s)

    def test_wrongCountTooShort(self) -> None:
        """A count shorter than the data: the rest is read as commands (RFC 3030 says so), answered 500."""
        s = new_session()
        out = feed(s, TXN + b"BDAT 3 LAST\r\nA: bc\r\n")
        self.assertEqual(codes(out)[-2:], [b"250 2.0.0", b"500 5.5.2"])
        normal_transaction(self, s)

    @FAST
    @given(chunks=st.lists(st.tuples(st.binary(max_size=40), st.booleans()), max_size=5),
           split=st.integers(min_value=1, max_value=50))
    def test_anyChunksAnySplit(self, chunks: list[tuple[bytes, bool]], split: int) -> None:
        """Any chunk contents, with or without LAST, fed in pieces: one reply per BDAT, grammar kept, then in sync."""
        s = new_session()
        data = TXN + b"".join(b"BDAT %d%s\r\n" % (len(c), b" LAST" if last else b"") + c for c, last in chunks)
        out = b"".join(feed(s, data[i : i + split]) for i in range(0, len(data), split))
        self.assertEqual(len(codes(out)), 3 + len(chunks))
        normal_transaction(self, s)


class DsnParameterTests(SynchronousTestCase):
    def test_malformedOrcpt(self) -> None:
        """Malformed xtext in ORCPT/ENVID, bad NOTIFY/RET: 501 5.5.4, the transaction goes on."""
        s = new_session()
        feed(s, b"EHLO c\r\n")
        self.assertEqual(codes(feed(s, b"MAIL FROM:<x@client.test> ENVID=a+zz\r\n")), [b"501 5.5.4"])
        self.assertEqual(codes(feed(s, b"MAIL FROM:<x@client.test> RET=NONE\r\n")), [b"501 5.5.4"])
        feed(s, b"MAIL FROM:<x@client.test>\r\n")
        for param in (b"ORCPT=rfc822;a+", b"ORCPT=rfc822;a+0D+0Ab", b"ORCPT=;a", b"ORCPT=rfc822", b"NOTIFY=",
                      b"NOTIFY=NEVER,SUCCESS", b"ORCPT=rfc822;" + b"a" * 600):
            self.assertEqual(codes(feed(s, b"RCPT TO:<alice@example.org> " + param + b"\r\n")), [b"501 5.5.4"], param)
        normal_transaction(self, s)


class Utf8PathTests(SynchronousTestCase):
    def test_malformedUtf8(self) -> None:
        """Invalid UTF-8 in a path (with SMTPUTF8): 501 5.6.7; without SMTPUTF8 any 8-bit path: 553 5.6.7."""
        s = new_session()
        feed(s, b"EHLO c\r\n")
        for path in (b"<\xff@client.test>", b"<a\xc3@client.test>", b"<\xed\xa0\x80@client.test>"):
            self.assertEqual(codes(feed(s, b"MAIL FROM:" + path + b" SMTPUTF8\r\n")), [b"501 5.6.7"], path)
        self.assertEqual(codes(feed(s, b"MAIL FROM:<j\xc3\xb6rg@client.test>\r\n")), [b"553 5.6.7"])
        self.assertEqual(codes(feed(s, b"MAIL FROM:<x@client.test> SMTPUTF8\r\n")), [b"250 2.1.0"])
        self.assertEqual(codes(feed(s, b"RCPT TO:<\xff@example.org>\r\n")), [b"501 5.6.7"])
        self.assertEqual(codes(feed(s, b"RCPT TO:<a\xe2\x80\xaeb@example.org>\r\n")), [b"501 5.1.3"])  # U+202E
        normal_transaction(self, s)
