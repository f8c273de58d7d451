# -*- test-case-name: tests.dkimsign.test_canon -*-
"""RFC 6376 section 3.4 canonicalization of header fields and body: "relaxed"
for signing and verifying, "simple" (the body, ``SimpleBodyHash``) for verifying.

Header fields are handled as ``(name, raw)`` pairs, where ``raw`` is the whole
field exactly as received: the name, the colon, the value with any folding, and
the final CRLF (``header_fields`` splits a header block into such pairs).

The body is canonicalized and hashed incrementally by ``BodyHash``: the message
streams through ``feed(chunk)`` in whatever pieces the disk or the network
delivers, so a 25 MB message is hashed without being held in memory.  Only an
unfinished line is kept between chunks, and a line longer than ``MAX_PENDING``
is hashed in parts, so memory stays bounded whatever the input.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence

# RFC 6376 section 2.8: WSP is SP or HTAB.
_WSP_RUN = re.compile(rb"[ \t]+")
# Trailing WSP of a line and its terminator (a bare LF is accepted too).
_LINE_END = re.compile(rb"[ \t]*\r?\n")
_FOLD = re.compile(rb"\r?\n")
_SPACES = re.compile(rb"  +")

MAX_PENDING = 65536

HeaderField = tuple[str, bytes]


def header_fields(block: bytes) -> list[HeaderField]:
    """Split a header block (up to, not including, the empty line) into
    ``(name, raw)`` pairs; continuation lines (starting with WSP) belong to the
    field above them (RFC 5322 section 2.2.3)."""
    fields: list[HeaderField] = []
    for line in _lines(block):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            name = line.split(b":", 1)[0].strip(b" \t").decode("ascii", "replace")
            fields.append((name, line))
    return fields


def _lines(block: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(block):
        end = block.find(b"\n", start)
        end = len(block) if end < 0 else end + 1
        yield block[start:end]
        start = end


def selected(headers: Sequence[HeaderField], names: Sequence[str]) -> list[bytes]:
    """The raw fields a signature's ``h=`` list names, in its order; repeated
    names take the instances from the bottom up and a name with none left
    adds nothing (RFC 6376 section 5.4.2).  ``names`` are lowercase."""
    stacks: dict[str, list[bytes]] = {}
    for name, raw in headers:
        stacks.setdefault(name.lower(), []).append(raw)
    out = []
    for name in names:
        stack = stacks.get(name)
        if stack:
            out.append(stack.pop())
    return out


def relaxed_header(raw: bytes) -> bytes:
    """RFC 6376 section 3.4.2: lowercase name, unfolded value with WSP runs
    reduced to one SP, no WSP around the colon or at the end; ends in CRLF."""
    name, _, value = raw.partition(b":")
    if b"\t" not in value and b"  " not in value and value.find(b"\n") == len(value) - 1 and value.endswith(b"\r\n"):
        # The usual field, one line without tabs or runs of spaces: nothing to
        # unfold or reduce, and bytes methods are much cheaper than the regexes.
        value = value[:-2].strip(b" ")
    else:
        value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value)).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


def _normalized(block: bytes) -> bytes:
    """Complete lines with WSP runs made one SP, trailing WSP dropped, LF endings.

    With CRLF endings only (all the session ever passes on) bytes methods do
    most of the work, several times faster than the regular expressions of
    the general case (bare LF endings, accepted for other callers)."""
    if block.count(b"\n") != block.count(b"\r\n"):
        return _WSP_RUN.sub(b" ", _LINE_END.sub(b"\n", block))
    text = block.replace(b"\t", b" ")
    if b"  " in text:
        text = _SPACES.sub(b" ", text)
    return text.replace(b" \r\n", b"\r\n").replace(b"\r\n", b"\n")


class BodyHash:
    """SHA-256 of the relaxed canonical body (RFC 6376 section 3.4.4), fed in chunks.

    Lines: trailing WSP is dropped and WSP runs become one SP.  Empty lines are
    counted, not hashed, until a non-empty line follows: empty lines at the end
    of the body are ignored.  A non-empty body ends with CRLF; an empty one
    hashes as the empty string (RFC 6376 errata 3133).
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""  # the current line, not yet terminated
        self._empty = 0  # empty lines seen but not yet hashed
        self._open = False  # part of the current (long) line is hashed already

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk if self._partial else bytes(chunk)
        cut = data.rfind(b"\n") + 1
        if cut:
            self._lines(data[:cut])
        rest = data[cut:]
        if len(rest) > MAX_PENDING:
            # A very long line: hash what no later chunk can change.  Kept
            # back: trailing WSP (it may end the line and be dropped) and a
            # final CR (it may be half of a CRLF).
            keep = len((rest[:-1] if rest.endswith(b"\r") else rest).rstrip(b" \t"))
            if keep:
                self._begin_line()
                self._hash.update(_WSP_RUN.sub(b" ", rest[:keep]))
            # The tail is WSP and at most one CR; one SP stands for any WSP run.
            rest = _WSP_RUN.sub(b" ", rest[keep:])
        self._partial = rest

    def digest(self) -> bytes:
        """The body hash (raw bytes; base64 it for ``bh=``).  Call once, at the end."""
        if self._partial or self._open:
            tail = _WSP_RUN.sub(b" ", self._partial).rstrip(b" ")
            if tail or self._open:
                self._begin_line()
                self._hash.update(tail + b"\r\n")
            self._partial, self._open = b"", False
        return self._hash.digest()

    def _begin_line(self) -> None:
        """Hash the empty lines held back, now that a non-empty line follows."""
        if not self._open:
            if self._empty:
                self._hash.update(b"\r\n" * self._empty)
                self._empty = 0
            self._open = True

    def _lines(self, block: bytes) -> None:
        """Hash complete lines (``block`` ends with LF)."""
        if not self._open and self._plain(block):
            return
        text = _normalized(block)
        if self._open:
            # The rest of a line whose start is hashed: non-empty however it ends.
            first, _, text = text.partition(b"\n")
            self._hash.update(first.rstrip(b" ") + b"\r\n")
            self._open = False
        body = text.rstrip(b"\n")
        if body:
            if self._empty:
                self._hash.update(b"\r\n" * self._empty)
            self._hash.update(body.replace(b"\n", b"\r\n") + b"\r\n")
            self._empty = len(text) - len(body) - 1
        else:
            self._empty += len(text)

    def _plain(self, block: bytes) -> bool:
        """The fast path for lines without WSP and with CRLF endings (base64
        attachments, most of a big message): already canonical, so hashed as
        they are.  False (nothing done) when the block needs the general path."""
        if b" " in block or b"\t" in block or block.count(b"\n") != block.count(b"\r\n"):
            return False
        body = block.rstrip(b"\r\n")
        tail = block[len(body) :]
        empty = tail.count(b"\n")
        if tail != b"\r\n" * empty:
            return False  # a line ending in CR next to the trailing CRLFs
        if body:
            if self._empty:
                self._hash.update(b"\r\n" * self._empty)
            self._hash.update(body + b"\r\n")
            self._empty = empty - 1
        else:
            self._empty += empty
        return True


class SimpleBodyHash:
    """SHA-256 of the simple canonical body (RFC 6376 section 3.4.3), fed in chunks.

    The body is hashed as it is, except that CRLFs at its end are held back
    until more content follows: all empty lines at the end are ignored, and
    the body ends with exactly one CRLF (an empty body is a single CRLF).
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._held = b""  # CRLF pairs at the end so far, maybe then one CR

    def feed(self, chunk: bytes) -> None:
        data = self._held + chunk if self._held else bytes(chunk)
        end = len(data) - data.endswith(b"\r")  # a CR may be half of a CRLF
        while data.endswith(b"\r\n", 0, end):
            end -= 2
        self._hash.update(data[:end])
        self._held = data[end:]

    def digest(self) -> bytes:
        """The body hash (raw bytes).  Call once, at the end."""
        # A held CR not followed by LF is content, and so are the CRLFs before it.
        self._hash.update((self._held if self._held.endswith(b"\r") else b"") + b"\r\n")
        self._held = b""
        return self._hash.digest()
