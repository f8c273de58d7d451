"""The header section reader, field validation and the edits applied before a commit."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from mailstack.envelope import HeaderChanges
from mailstack.headers import HeaderReader, edited, field_name, rewrite

MESSAGE = (
    b"Received: from a by b; Mon, 1 Dec 2025 10:00:00 +0000\r\n"
    b"Subject: folded\r\n"
    b" second line\r\n"
    b"From: <a@example.org>\r\n"
    b"\r\n"
    b"Body: not a header\r\n"
)


def read(data: bytes, chunk: int = 0, limit: int = 1024) -> HeaderReader:
    reader = HeaderReader(limit)
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        reader.feed(data[i : i + step])
    reader.end()
    return reader


class HeaderReaderTests(SynchronousTestCase):
    def test_fieldsAndLength(self):
        """Fields keep their raw bytes (continuations included); the section ends at the empty line."""
        r = read(MESSAGE)
        self.assertEqual([name for name, _ in r.fields], ["Received", "Subject", "From"])
        self.assertEqual(r.fields[1][1], b"Subject: folded\r\n second line\r\n")
        self.assertEqual(r.length, MESSAGE.index(b"\r\n\r\n") + 2)
        self.assertFalse(r.overflow)

    def test_anySplitGivesTheSameFields(self):
        """Fed byte by byte or in odd chunks, the result does not change."""
        whole = read(MESSAGE)
        for chunk in (1, 2, 3, 5, 7):
            r = read(MESSAGE, chunk)
            self.assertEqual((r.fields, r.length), (whole.fields, whole.length), chunk)

    def test_emptyHeaderSection(self):
        """A message starting with an empty line has no fields."""
        r = read(b"\r\nSubject: body\r\n")
        self.assertEqual((r.fields, r.length), ((), 0))

    def test_nonHeaderLineEndsTheSection(self):
        """A line that is neither a field nor a continuation starts the body (as in Postfix)."""
        r = read(b"Subject: x\r\nnot a field\r\nFrom: y\r\n\r\n")
        self.assertEqual([n for n, _ in r.fields], ["Subject"])
        self.assertEqual(r.length, len(b"Subject: x\r\n"))

    def test_noEmptyLine(self):
        """A message that is all header fields: every field is read at the end."""
        r = read(b"Subject: x\r\nFrom: y\r\n")
        self.assertEqual([n for n, _ in r.fields], ["Subject", "From"])

    def test_overflow(self):
        """A header section longer than the limit that never ends is flagged, and memory stays bounded."""
        reader = HeaderReader(100)
        for _ in range(1000):
            reader.feed(b"X-Filler: " + b"y" * 40 + b"\r\n")
        self.assertTrue(reader.done)
        self.assertTrue(reader.overflow)
        self.assertLessEqual(sum(len(raw) for _, raw in reader.fields), 104)

    def test_bytewiseFeedIsLinear(self):
        """A header section sent one byte per read is collected without re-copying it each time."""
        reader = HeaderReader(64 * 1024)
        data = b"X-Long: " + b"a" * (64 * 1024)
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
        self.assertTrue(reader.overflow)
        self.assertIsInstance(reader._buf, bytearray)

    def test_limitReachedInTheBody(self):
        """A non-header line before the limit ends the section: no overflow."""
        r = read(b"Subject: x\r\n" + b"body line\r\n" * 200, limit=100)
        self.assertFalse(r.overflow)
        self.assertEqual(r.length, len(b"Subject: x\r\n"))


class FieldTests(SynchronousTestCase):
    def test_fieldName(self):
        """A well-formed field gives its name; folded lines are allowed."""
        self.assertEqual(field_name(b"X-Check: a\r\n\tb\r\n"), "X-Check")

    def test_malformedFields(self):
        """No CRLF, a bare LF, an empty continuation or no name: ValueError."""
        for raw in (b"X: a", b"X: a\nb\r\n", b"X: a\r\n\r\n", b": a\r\n", b"X a\r\n", b"X: a\r\nb\r\n"):
            self.assertRaises(ValueError, field_name, raw)

    def test_edited(self):
        """Prepended fields first, then the kept fields in their order."""
        fields = read(MESSAGE).fields
        changes = HeaderChanges((b"A: 1\r\n", b"B: 2\r\n"), (lambda name, raw: name.lower() == "subject",))
        self.assertEqual(
            edited(fields, changes),
            b"A: 1\r\nB: 2\r\n" + fields[0][1] + fields[2][1],
        )

    def test_rewrite(self):
        """The file becomes the new head plus its bytes from the body offset; no temporary is left."""
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "m")
        body = b"\r\n" + b"z" * 3_000_000
        with open(path, "wb") as f:
            f.write(b"Old: header\r\n" + body)
        rewrite(path, b"New: 1\r\n", len(b"Old: header\r\n"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"New: 1\r\n" + body)
        self.assertEqual(os.listdir(folder), ["m"])
