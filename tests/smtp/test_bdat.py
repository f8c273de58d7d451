"""CHUNKING (RFC 3030): the BDAT parser, the chunk reader and BDAT conversations."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailstack.smtp import replies as R
from mailstack.smtp.bdat import ChunkDecoder, Skip, parse_bdat

from .support import Session

TXN = b"EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<bob@example.org>\r\n"


class ParseTests(SynchronousTestCase):
    def test_counts(self) -> None:
        """A decimal count, optionally followed by LAST (any case)."""
        self.assertEqual(parse_bdat("0"), (0, False))
        self.assertEqual(parse_bdat("12 LAST"), (12, True))
        self.assertEqual(parse_bdat("7 last"), (7, True))

    def test_unreadable(self) -> None:
        """No count, a sign, letters, junk after LAST or over 20 digits: 501 5.5.4."""
        for arg in ("", "-5", "+5", "x", "5 NOW", "5 LAST x", "1" * 21, "5x", " 5"):
            self.assertIs(parse_bdat(arg), R.BDAT_SYNTAX, arg)


class ReaderTests(SynchronousTestCase):
    def test_exactCount(self) -> None:
        """The decoder passes on exactly n octets, dots and terminators included, and hands back the rest."""
        out: list[bytes] = []
        d = ChunkDecoder(out.append)
        d.expect(11)
        self.assertIsNone(d.feed(b".\r\n.\r"))
        self.assertEqual(d.feed(b"\n\r\n.\r\nQUIT\r\n"), b"QUIT\r\n")
        self.assertEqual(b"".join(out), b".\r\n.\r\n\r\n.\r\n")
        self.assertFalse(d.bare_newline)

    def test_crlfAcrossChunks(self) -> None:
        """A CRLF split between two chunks is no bare CR."""
        out: list[bytes] = []
        d = ChunkDecoder(out.append)
        d.expect(3)
        d.feed(b"a:b")
        d.expect(2)
        d.feed(b"\r")
        self.assertIsNone(d.feed(b""))
        d.expect(1)
        d.feed(b"\n")
        d.finish()
        self.assertFalse(d.bare_newline)
        self.assertEqual(b"".join(out), b"a:b\r\n")

    def test_bareNewlines(self) -> None:
        """A bare LF, or a final CR without LF, is noted."""
        for data in (b"a\nb\r\n", b"a\r\n\r"):
            d = ChunkDecoder(lambda _: None)
            d.expect(len(data))
            d.feed(data)
            d.finish()
            self.assertTrue(d.bare_newline, data)

    def test_missingFinalCRLF(self) -> None:
        """A message whose last line lacks CRLF gets one (it must be relayable with DATA)."""
        out: list[bytes] = []
        d = ChunkDecoder(out.append)
        d.expect(4)
        d.feed(b"a: b")
        d.finish()
        self.assertEqual(b"".join(out), b"a: b\r\n")

    def test_tooBig(self) -> None:
        """Past the size limit nothing more reaches the sink."""
        out: list[bytes] = []
        d = ChunkDecoder(out.append, max_size=4)
        d.expect(6)
        d.feed(b"abcdef")
        self.assertTrue(d.too_big)
        self.assertEqual(out, [])

    def test_skip(self) -> None:
        """Skip consumes n octets and returns what follows."""
        s = Skip(5)
        self.assertIsNone(s.feed(b"abc"))
        self.assertEqual(s.feed(b"deNOOP"), b"NOOP")


class SessionTests(SynchronousTestCase):
    def test_offered(self) -> None:
        """EHLO offers CHUNKING, not BINARYMIME."""
        kw = Session().talk(b"EHLO c")
        self.assertIn(b"250-CHUNKING", kw)
        self.assertFalse(any(b"BINARYMIME" in line for line in kw))

    def test_twoPipelinedChunks(self) -> None:
        """Two chunks pipelined with the commands in one read: the exact bytes, 250 per chunk, queued after LAST."""
        s = Session()
        body1 = b"Subject: x\r\n\r\n.leading dot\r\n"
        body2 = b".\r\nend\r\n"
        out = s.send(TXN + b"BDAT %d\r\n" % len(body1) + body1 + b"BDAT %d LAST\r\n" % len(body2) + body2 + b"NOOP\r\n")
        lines = out.split(b"\r\n")[:-1]
        self.assertEqual(lines[-3], b"250 2.0.0 %d octets received" % len(body1))
        self.assertTrue(lines[-2].startswith(b"250 2.0.0 Ok: queued as"), lines)
        self.assertEqual(lines[-1], b"250 2.0.0 Ok")
        self.assertEqual(s.intake.committed[0].data, body1 + body2)

    def test_bytewise(self) -> None:
        """Fed one byte per read, the result is the same."""
        s = Session()
        out = s.send_bytewise(TXN + b"BDAT 5 LAST\r\nA: b\n")
        self.assertIn(b"550 5.6.0", out)  # the bare LF is refused ...
        s = Session()
        out = s.send_bytewise(TXN + b"BDAT 6 LAST\r\nA: b\r\nNOOP\r\n")
        self.assertIn(b"queued as", out)
        self.assertTrue(out.endswith(b"250 2.0.0 Ok\r\n"))
        self.assertEqual(s.intake.committed[0].data, b"A: b\r\n")

    def test_replyAfterCommit(self) -> None:
        """The reply to BDAT LAST waits for the commit (durability as for DATA)."""
        s = Session()
        s.intake.manual = True
        out = s.send(TXN + b"BDAT 6 LAST\r\nA: b\r\n")
        self.assertNotIn(b"queued", out)
        s.intake.begun[0].commit("QX")
        self.assertIn(b"250 2.0.0 Ok: queued as QX", s.take())

    def test_withoutTransaction(self) -> None:
        """BDAT without MAIL, or without RCPT: the octets are consumed, then 503; the session stays in sync."""
        s = Session()
        out = s.send(b"EHLO c\r\nBDAT 6 LAST\r\nRSET\r\nNOOP\r\n")
        self.assertTrue(out.endswith(b"503 5.5.1 Need MAIL command first\r\n250 2.0.0 Ok\r\n"), out)
        out = s.send(b"MAIL FROM:<a@example.net>\r\nBDAT 4\r\nNOOPNOOP\r\n")
        self.assertTrue(out.endswith(b"503 5.5.1 Need RCPT command first\r\n250 2.0.0 Ok\r\n"), out)

    def test_afterFailedChunk(self) -> None:
        """After a refused chunk the transaction is over: later chunks are consumed and get 503."""
        s = Session()
        out = s.send(TXN + b"BDAT 3\r\na\nb" + b"BDAT 4 LAST\r\nQUIT" + b"NOOP\r\n")
        lines = out.split(b"\r\n")[:-1]
        self.assertEqual([line[:9] for line in lines[-3:]], [b"550 5.6.0", b"503 5.5.1", b"250 2.0.0"])
        self.assertTrue(s.intake.begun[0].aborted)
        self.assertFalse(s.closed)

    def test_dataAfterBdat(self) -> None:
        """DATA inside a BDAT transfer: 503, what was pipelined behind the refused
        DATA is discarded, and the BDAT transfer can go on."""
        s = Session()
        out = s.send(TXN + b"BDAT 6\r\nA: b\r\nDATA\r\nBDAT 0 LAST\r\n")
        self.assertIn(b"503 5.5.1 DATA not allowed after BDAT", out)
        self.assertNotIn(b"queued as", out)
        self.assertIn(b"queued as", s.send(b"BDAT 0 LAST\r\n"))
        self.assertEqual(s.intake.committed[0].data, b"A: b\r\n")

    def test_rsetAborts(self) -> None:
        """RSET between chunks aborts the message."""
        s = Session()
        s.send(TXN + b"BDAT 6\r\nA: b\r\nRSET\r\n")
        self.assertTrue(s.intake.begun[0].aborted)
        self.assertEqual(s.intake.committed, [])

    def test_tooBig(self) -> None:
        """Over SIZE: 552 5.3.4 after the chunk, all octets consumed."""
        s = Session()
        big = b"x" * 10001
        out = s.send(TXN + b"BDAT %d LAST\r\n" % len(big) + big + b"NOOP\r\n")
        self.assertTrue(out.endswith(b"552 5.3.4 Message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n"), out)

    def test_zeroLast(self) -> None:
        """BDAT 0 LAST ends a message at once."""
        s = Session()
        out = s.send(TXN + b"BDAT 6\r\nA: b\r\nBDAT 0 LAST\r\n")
        self.assertIn(b"queued as", out)
