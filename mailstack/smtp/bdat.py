# -*- test-case-name: tests.smtp.test_bdat -*-
"""CHUNKING (RFC 3030): the ``BDAT`` argument and the exact-count chunk reader.

``BDAT <n> [LAST]`` is followed by exactly ``n`` octets of message data: no
dot-stuffing, no end-of-data scanning (RFC 3030 section 2).  Whatever state
the transaction is in, the session consumes those ``n`` octets before it
answers, so a refused chunk never desynchronises the command stream
(section 3: "the receiver-SMTP MUST ... read and discard the data").  Only a
``BDAT`` whose count cannot be read is answered 501 at once: its octets are
then indistinguishable from commands, as with any syntax error.

``ChunkDecoder`` keeps the message-level state across the chunks of one
message with the same attributes as ``smtp.data.DataDecoder`` (``size``,
``too_big``, ``bare_newline``), so the session's end-of-data path is shared.
Bare CR / bare LF are refused as for DATA (550 5.6.0): a stored message is
relayed with DATA, where they are the raw material of SMTP smuggling.  BINARYMIME
is not offered, so that rule stands (RFC 3030 section 3: without it the data
is text with CRLF line ends).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mailstack.errors import Reply
from mailstack.smtp import replies as R

_CRLF = b"\r\n"
# RFC 3030 section 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF;
# chunk-size = 1*DIGIT.  Twenty digits bound the number, not the session.
_ARG = re.compile(r"([0-9]{1,20})(?: +(LAST))?\Z", re.IGNORECASE)


def parse_bdat(arg: str) -> tuple[int, bool] | Reply:
    """``"<n> [LAST]"`` -> ``(n, last)``, or 501 when the count cannot be read."""
    m = _ARG.match(arg)
    if not m:
        return R.BDAT_SYNTAX
    return int(m.group(1)), m.group(2) is not None


def take(data: bytes, remaining: int) -> tuple[bytes, bytes]:
    """``(chunk, rest)``: up to ``remaining`` octets of ``data`` and what follows them."""
    return data[:remaining], data[remaining:]


class Skip:
    """Reads and discards ``n`` octets (a refused chunk); ``feed`` as for the decoders."""

    __slots__ = ("remaining",)

    def __init__(self, n: int) -> None:
        self.remaining = n

    def feed(self, data: bytes) -> bytes | None:
        used, rest = take(data, self.remaining)
        self.remaining -= len(used)
        return rest if self.remaining == 0 else None


class ChunkDecoder:
    """The octets of one message's BDAT chunks, passed to ``sink`` as they arrive.

    ``expect(n)`` starts a chunk; ``feed`` returns None until its ``n`` octets
    are in, then the bytes that followed them (the next pipelined command).
    ``finish()`` after the LAST chunk.
    """

    __slots__ = ("_cr", "_end", "_max_size", "_sink", "bare_newline", "remaining", "size", "too_big")

    def __init__(self, sink: Callable[[bytes], None], max_size: int = 0) -> None:
        self._sink = sink
        self._max_size = max_size  # 0: unlimited
        self._cr = False  # the last octet so far is a CR (its LF may start the next chunk)
        self._end = b""  # the last two octets so far
        self.remaining = 0
        self.size = 0
        self.too_big = False
        self.bare_newline = False

    def expect(self, n: int) -> None:
        self.remaining = n

    def feed(self, data: bytes) -> bytes | None:
        chunk, rest = take(data, self.remaining)
        self.remaining -= len(chunk)
        if chunk:
            self._emit(chunk)
        return rest if self.remaining == 0 else None

    def finish(self) -> None:
        """The LAST chunk is in: a final CR without its LF is a bare CR; a message
        whose last line has no CRLF gets one (RFC 5322 section 2.1: lines end in
        CRLF), so it can be relayed with DATA."""
        if self._cr:
            self.bare_newline = True
        elif self.size and self._end != _CRLF:
            self._emit(_CRLF)

    def _emit(self, chunk: bytes) -> None:
        if not self.bare_newline:
            work = (b"\r" if self._cr else b"") + chunk
            self._cr = work.endswith(b"\r")
            if self._cr:
                work = work[:-1]
            pairs = work.count(_CRLF)
            if work.count(b"\r") != pairs or work.count(b"\n") != pairs:
                self.bare_newline = True
        self._end = (self._end + chunk)[-2:]
        self.size += len(chunk)
        if self._max_size and self.size > self._max_size:
            self.too_big = True
        if not self.too_big and not self.bare_newline:
            self._sink(chunk)
