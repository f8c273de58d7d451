"""Tests for mailstack.dkim.canon: relaxed header and streaming body canonicalization."""

import hashlib
import re

from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.dkim import canon


def reference_body(body: bytes) -> bytes:
    """RFC 6376 section 3.4.4 read literally, line by line (the test's own oracle)."""
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in lines]
    while out and out[-1] == b"":
        out.pop()
    return b"".join(line + b"\r\n" for line in out)


def hashed(chunks) -> bytes:
    h = canon.BodyHash()
    for chunk in chunks:
        h.feed(chunk)
    return h.digest()


TOKENS = st.sampled_from([b"a", b"b", b" ", b"\t", b"\r\n", b"\r\n\r\n", b"  \t ", b"\r"])
# Without WSP, blocks take BodyHash's fast path; with it, the general one.
PLAIN = st.sampled_from([b"a", b"b", b"\r\n", b"\r\n\r\n", b"\r"])
BODIES = st.one_of(st.lists(TOKENS, max_size=60), st.lists(PLAIN, max_size=60)).map(b"".join)


class HeaderTests(SynchronousTestCase):
    def test_relaxedHeader(self):
        """Name lowercased, value unfolded, WSP runs one SP, no WSP around the colon or at the end."""
        raw = b"SubJect \t:  Hello \t world\r\n \t again  \r\n"
        self.assertEqual(canon.relaxed_header(raw), b"subject:Hello world again\r\n")

    def test_headerFields(self):
        """A header block splits into (name, raw) pairs with continuation lines attached."""
        block = b"From: a@example.org\r\nSubject: one\r\n two\r\nTo: b@example.net\r\n"
        self.assertEqual(
            canon.header_fields(block),
            [
                ("From", b"From: a@example.org\r\n"),
                ("Subject", b"Subject: one\r\n two\r\n"),
                ("To", b"To: b@example.net\r\n"),
            ],
        )


class BodyTests(SynchronousTestCase):
    def test_examples(self):
        """RFC 6376 section 3.4.6's example body and the empty-body cases."""
        body = b" C \r\nD \t E\r\n\r\n\r\n"
        self.assertEqual(hashed([body]), hashlib.sha256(b" C\r\nD E\r\n").digest())
        self.assertEqual(hashed([]), hashlib.sha256(b"").digest())
        self.assertEqual(hashed([b"\r\n \r\n\t\r\n"]), hashlib.sha256(b"").digest())
        self.assertEqual(hashed([b"no newline  "]), hashlib.sha256(b"no newline\r\n").digest())

    def test_bareLineFeeds(self):
        """Bare LF endings (the general path) canonicalize as CRLF ones (the fast path) do."""
        for body in (b" C \nD \t E\n\n", b"a  b\t\nc \r\n\n"):
            self.assertEqual(hashed([body]), hashed([body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")]))

    @settings(max_examples=300, deadline=None)
    @given(BODIES, st.lists(st.integers(min_value=0, max_value=400), max_size=12))
    def test_chunkingInvariant(self, body, cuts):
        """Any chunking of the body gives the one-shot hash, which is the RFC's canonical form
        (with and without whitespace, so both the fast and the general path are checked)."""
        points = sorted({min(c, len(body)) for c in cuts})
        chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
        one_shot = hashed([body])
        self.assertEqual(hashed(chunks), one_shot)
        if b"\r" not in body.replace(b"\r\n", b""):
            self.assertEqual(one_shot, hashlib.sha256(reference_body(body)).digest())
        if body.endswith(b"\r\n"):
            # And so does a different implementation (dkimpy's).
            self.assertEqual(one_shot, hashlib.sha256(Relaxed.canonicalize_body(body)).digest())

    @settings(max_examples=50, deadline=None)
    @given(st.integers(min_value=1, max_value=5000), st.integers(min_value=1, max_value=5000))
    def test_longLine(self, spaces, size):
        """A line longer than MAX_PENDING is hashed in parts with the same result,
        and what is held between chunks stays bounded."""
        self.patch(canon, "MAX_PENDING", 64)
        body = (b"x" + b" " * spaces + b"y\t") * 40 + b" " * spaces + b"\r\n\r\nend\r\n"
        h = canon.BodyHash()
        for i in range(0, len(body), size):
            h.feed(body[i : i + size])
            self.assertLessEqual(len(h._partial), 64 + size)
        self.assertEqual(h.digest(), hashlib.sha256(reference_body(body)).digest())

    def test_longWhitespaceLine(self):
        """A line of nothing but whitespace longer than MAX_PENDING is still an empty line."""
        self.patch(canon, "MAX_PENDING", 64)
        h = canon.BodyHash()
        h.feed(b"a\r\n")
        for _ in range(100):
            h.feed(b" \t" * 50)
        self.assertLess(len(h._partial), 130)
        h.feed(b"\r\n")
        self.assertEqual(h.digest(), hashlib.sha256(b"a\r\n").digest())


class SimpleBodyTests(SynchronousTestCase):
    def test_examples(self):
        """RFC 6376 section 3.4.3: trailing empty lines dropped, one CRLF at the end, empty body is CRLF."""
        for body, canonical in (
            (b" C \r\nD \t E\r\n\r\n\r\n", b" C \r\nD \t E\r\n"),
            (b"", b"\r\n"),
            (b"\r\n\r\n", b"\r\n"),
            (b"no newline  ", b"no newline  \r\n"),
            (b"cr\r", b"cr\r\r\n"),
        ):
            h = canon.SimpleBodyHash()
            h.feed(body)
            self.assertEqual(h.digest(), hashlib.sha256(canonical).digest())

    @settings(max_examples=300, deadline=None)
    @given(BODIES, st.lists(st.integers(min_value=0, max_value=400), max_size=12))
    def test_chunkingInvariant(self, body, cuts):
        """Any chunking of the body gives dkimpy's simple canonical form."""
        points = sorted({min(c, len(body)) for c in cuts})
        h = canon.SimpleBodyHash()
        for a, b in zip([0, *points], [*points, len(body)], strict=True):
            h.feed(body[a:b])
        self.assertEqual(h.digest(), hashlib.sha256(Simple.canonicalize_body(body)).digest())
