# -*- test-case-name: tests.test_headers -*-
"""The header section of a message being received, and the edits checks ask for.

``HeaderReader`` is fed the message bytes as they arrive and keeps only the
header section (RFC 5322 section 2.2), at most ``HEADER_LIMIT`` bytes of it,
split into fields: ``(name, raw)`` with ``raw`` the whole field as received,
name, colon, folded continuation lines and the final CRLF.  The section ends
at the first empty line or, as in Postfix's cleanup, at the first line that is
neither a field nor a continuation (the rest is body, copied untouched).

A header section longer than the limit that never ends is refused (552 5.3.4,
as Exim does with ``header_maxsize``): memory per session stays bounded, and a
field the reader never saw could not be removed (a forged
``Authentication-Results:`` hidden behind a megabyte of header fields).

``edited`` builds the new header section from the check verdicts
(``envelope.HeaderChanges``); ``rewrite`` writes a spilled message's final
file in a thread: new header section, then the body copied by the kernel.
"""

from __future__ import annotations

import os
import re

from mailstack.envelope import HeaderChanges

# Header bytes held per message being received; see the module docstring.
HEADER_LIMIT = 256 * 1024

# RFC 5322 section 3.6.8: field-name = 1*ftext (printable US-ASCII except colon).
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_COPY_CHUNK = 1 << 20

Field = tuple[str, bytes]


class HeaderReader:
    """Collects the header section of a message streamed through ``feed``."""

    __slots__ = ("_buf", "_limit", "done", "fields", "length", "overflow")

    def __init__(self, limit: int = HEADER_LIMIT) -> None:
        self._buf = bytearray()  # appended per chunk: a client sending byte by byte costs O(n)
        self._limit = limit
        self.done = False  # the header section is complete (or overflowed)
        self.overflow = False  # longer than the limit and still going: refuse
        self.fields: tuple[Field, ...] = ()
        self.length = 0  # bytes of the header section, the ending empty line excluded

    def feed(self, data: bytes) -> None:
        """More message bytes; cheap once the header section is complete."""
        if self.done:
            return
        start = max(0, len(self._buf) - 3)
        self._buf += data[: self._limit + 4 - len(self._buf)]
        if self._buf.startswith(b"\r\n"):
            self._complete(0)
            return
        end = self._buf.find(b"\r\n\r\n", start)
        if end >= 0:
            self._complete(end + 2)
        elif len(self._buf) > self._limit:
            self._complete(None)

    def end(self) -> None:
        """The message is complete: whatever was collected is the header section."""
        if not self.done:
            self._complete(len(self._buf))

    def _complete(self, end: int | None) -> None:
        """Split ``_buf[:end]`` into fields; ``end`` None: the limit was reached."""
        buf = bytes(self._buf if end is None else self._buf[:end])
        self._buf = bytearray()
        self.done = True
        fields: list[Field] = []
        pos = 0
        body_line = False  # a line that is no header line ended the section
        while pos < len(buf):
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break  # a partial line at the limit, or a last line without CRLF
            line = buf[pos : eol + 2]
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            elif m := _FIELD.match(line):
                fields.append((m.group()[:-1].decode("ascii"), line))
            else:
                body_line = True
                break
            pos = eol + 2
        self.fields = tuple(fields)
        self.length = pos
        self.overflow = end is None and not body_line


def field_name(raw: bytes) -> str:
    """The name of one complete header field; ValueError if ``raw`` is not one.

    RFC 5322 section 2.2: ``name:``, lines ending in CRLF, continuation lines
    starting with white space, no bare CR or LF, no empty line.
    """
    m = _FIELD.match(raw)
    if not m or not raw.endswith(b"\r\n"):
        raise ValueError(f"not a header field: {raw[:40]!r}")
    lines = raw[:-2].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines) or any(
        not line or line[:1] not in (b" ", b"\t") for line in lines[1:]
    ):
        raise ValueError(f"not a header field: {raw[:40]!r}")
    return m.group()[:-1].decode("ascii")


def edited(fields: tuple[Field, ...], changes: HeaderChanges) -> bytes:
    """The new header section: the prepended fields, then the fields kept, in order."""
    return b"".join(changes.prepend) + b"".join(raw for name, raw in fields if not changes.removes(name, raw))


def rewrite(path: str, head: bytes, body_offset: int) -> None:
    """Blocking: replace the file at ``path`` by ``head`` + its bytes from ``body_offset``.

    A new file renamed over the old one; the body is copied inside the kernel
    (``copy_file_range``, a reflink on filesystems that share extents).  The
    caller fsyncs the result, as it would the original.
    """
    new = path + ".edit"
    with open(path, "rb") as src, open(new, "xb", buffering=0) as dst:
        try:
            dst.write(head)
            size = os.fstat(src.fileno()).st_size
            offset = body_offset
            while offset < size:
                try:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), min(_COPY_CHUNK, size - offset), offset)
                except OSError:  # a filesystem without it: copy through user space
                    src.seek(offset)
                    while chunk := src.read(_COPY_CHUNK):
                        dst.write(chunk)
                    break
                if n == 0:
                    break
                offset += n
        except BaseException:
            os.unlink(new)
            raise
    os.replace(new, path)
