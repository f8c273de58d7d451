"""Tests for mailstack.smtp.data: the streaming DATA decoder."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.smtp.data import DataDecoder
from tests.smtp.data_reference import SMUGGLING, decode_reference


def run(data: bytes, sizes: list[int] | None = None, max_size: int = 0):
    """Feed ``data`` split at ``sizes`` (cyclic); returns (content, rest, decoder)."""
    out: list[bytes] = []
    dec = DataDecoder(out.append, max_size)
    rest = None
    pos = 0
    i = 0
    while pos < len(data) or (pos == 0 and not data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        i += 1
        rest = dec.feed(data[pos : pos + max(n, 1)])
        pos += max(n, 1)
        if rest is not None:
            rest += data[pos:]
            break
        if not data:
            break
    return b"".join(out), rest, dec


class DecoderTests(SynchronousTestCase):
    def test_simple(self) -> None:
        """Content up to CRLF.CRLF, with the final CRLF kept; what follows is returned."""
        content, rest, dec = run(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(content, b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertTrue(dec.done)
        self.assertEqual(dec.size, len(content))

    def test_emptyMessage(self) -> None:
        """'.' right after the 354 is an empty message (the DATA line's CRLF counts)."""
        content, rest, _ = run(b".\r\n")
        self.assertEqual((content, rest), (b"", b""))

    def test_unstuffing(self) -> None:
        """A leading dot is removed from every line, including the first (RFC 5321 4.5.2)."""
        content, rest, _ = run(b"..first\r\n..\r\n...x\r\nmid.dle\r\n.\r\n")
        self.assertEqual(content, b".first\r\n.\r\n..x\r\nmid.dle\r\n")

    def test_incompleteKeepsWaiting(self) -> None:
        """Without the terminator, feed returns None and holds back at most 4 bytes."""
        out: list[bytes] = []
        dec = DataDecoder(out.append)
        self.assertIsNone(dec.feed(b"abc\r\n.\r"))
        self.assertEqual(b"".join(out), b"abc")
        self.assertEqual(dec.feed(b"\n"), b"")
        self.assertEqual(b"".join(out), b"abc\r\n")

    def test_smugglingSequencesDoNotEnd(self) -> None:
        """None of the scanner end-of-data lookalikes ends DATA (docs/smtp-smuggling.rst)."""
        for seq in SMUGGLING:
            data = b"body" + seq + b"mail FROM:<x@y>\r\nrcpt TO:<a@b>\r\ndata\r\nsmuggled\r\n.\r\n"
            for sizes in (None, [1]):
                content, rest, dec = run(data, sizes)
                self.assertEqual(rest, b"", seq)
                self.assertTrue(dec.done)

    def test_bareLF(self) -> None:
        """A bare LF or bare CR anywhere is flagged and nothing is passed on after it."""
        for body in (b"a\nb", b"a\rb", b"a\r", b"\n", b"ab\r\n\n", b"\r"):
            content, rest, dec = run(body + b"\r\n.\r\n", [1])
            self.assertTrue(dec.bare_newline, body)
            self.assertEqual(rest, b"")
        content, rest, dec = run(b"a\r\nb\r\n.\r\n", [1])
        self.assertFalse(dec.bare_newline)

    def test_longLine(self) -> None:
        """A 100 KB line is just content; the decoder is not line-based."""
        line = b"x" * 100_000
        content, rest, dec = run(line + b"\r\n.\r\nNOOP\r\n", [4096])
        self.assertEqual(content, line + b"\r\n")
        self.assertEqual(rest, b"NOOP\r\n")

    def test_sizeLimit(self) -> None:
        """Beyond max_size nothing more is passed on, reading continues to the end."""
        content, rest, dec = run(b"a" * 50 + b"\r\n" + b"b" * 50 + b"\r\n.\r\nQUIT\r\n", [7], max_size=60)
        self.assertTrue(dec.too_big)
        self.assertLessEqual(len(content), 60)
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertEqual(dec.size, 104)

    def test_exactlyAtLimit(self) -> None:
        """A message of exactly max_size octets is fine."""
        content, rest, dec = run(b"a" * 8 + b"\r\n.\r\n", max_size=10)
        self.assertFalse(dec.too_big)

    def test_feedAfterDone(self) -> None:
        """The decoder is single-use."""
        dec = DataDecoder(lambda b: None)
        dec.feed(b".\r\n")
        self.assertRaises(RuntimeError, dec.feed, b"x")


_ALPHABET = st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"\r\n..", b"\x00"])


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(
        pieces=st.lists(_ALPHABET, max_size=40),
        sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=5),
        terminate=st.booleans(),
    )
    def test_matchesReference(self, pieces, sizes, terminate) -> None:
        """Any split into reads gives the line-by-line reference result (content, rest, bare flag)."""
        data = b"".join(pieces) + (b"\r\n.\r\nNEXT" if terminate else b"")
        ref = decode_reference(data)
        content, rest, dec = run(data, sizes)
        if ref is None:
            self.assertIsNone(rest)
            return
        ref_content, ref_rest = ref
        self.assertEqual(rest, ref_rest)
        ref_bare = ref_content.count(b"\r") != ref_content.count(b"\r\n") or ref_content.count(
            b"\n"
        ) != ref_content.count(b"\r\n")
        # The raw bytes up to the terminator decide "bare"; unstuffing never changes it.
        self.assertEqual(dec.bare_newline, ref_bare)
        if not ref_bare:
            self.assertEqual(content, ref_content)
            self.assertEqual(dec.size, len(ref_content))
