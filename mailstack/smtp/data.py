# -*- test-case-name: tests.smtp.test_smtp_data -*-
"""The DATA phase both ways: the server's streaming decoder and the client's encoder.

``DataDecoder`` (receiving): bytes in, unstuffed message chunks out.
``DataEncoder`` and ``BodyProducer`` (relaying): a stored message out as a
DATA stream, read chunk by chunk from an ``IMessageSource``.

RFC 5321 section 4.1.1.4 and 4.5.2.  The decoder never splits input into lines;
per received chunk it does a handful of C-level ``bytes`` operations
(``find``/``replace``/``count``), so a 25 MB message costs a few hundred Python
calls, not one per line.

Rules, chosen against SMTP smuggling (docs/smtp-smuggling.rst):

* Only ``<CRLF>.<CRLF>`` ends the data.  The stream is treated as if it were
  preceded by the ``<CRLF>`` that ended the DATA command, so ``.<CRLF>`` right
  after the 354 is an empty message.
* Dot-unstuffing (4.5.2): a line that starts with ``.`` loses that dot; it is
  ``replace(b"\\r\\n.", b"\\r\\n")`` on each emitted chunk.  A chunk boundary never
  splits a ``<CRLF>.`` (the decoder holds back a tail of at most 4 bytes that
  starts with ``<CR>``), so the result does not depend on how the bytes were
  split into reads.
* Bare CR / bare LF (a CR not followed by LF, an LF not preceded by CR) never
  end anything; the decoder notes them (``bare_newline``) and the session rejects
  the message with 550 5.6.0 after the terminator.  Mailstack *rejects* rather
  than normalises (Postfix's default) so that the stored message stays
  byte-for-byte what the client sent and no ambiguous line boundary ever reaches
  a relay (the Sendmail 8.18 / chasquid / mox / OpenSMTPD choice).  Conforming
  clients (smtplib, swaks, every MUA) send CRLF only.
* Long lines: accepted, whatever their length (the 1000-octet limit of
  4.5.3.1.6 is a minimum the server must accept; Postfix accepts longer ones
  too).  Nothing here is line-based, so a long line can never desynchronise the
  session: only the total size is limited.
* Size (RFC 1870): content beyond ``max_size`` octets (after unstuffing) is not
  passed on; the decoder keeps reading to the terminator and reports
  ``too_big``, and the session answers 552 5.3.4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.interfaces import IMessageSource

TERMINATOR = b"\r\n.\r\n"
CHUNK = 64 * 1024  # bytes read from a message being relayed per read
_CRLF = b"\r\n"


class DataDecoder:
    """Feed raw DATA bytes with ``feed``; content goes to ``sink`` as it is decoded.

    ``feed`` returns None while the terminator has not been seen, then the bytes
    that followed it (the next pipelined commands), once.
    """

    __slots__ = ("_sink", "_max_size", "_tail", "_first", "size", "too_big", "bare_newline", "done")

    def __init__(self, sink: Callable[[bytes], None], max_size: int = 0) -> None:
        self._sink = sink
        self._max_size = max_size  # 0: unlimited
        self._tail = _CRLF  # the virtual CRLF that ended the DATA command
        self._first = True  # the virtual CRLF has not been stripped yet
        self.size = 0  # octets of content (after unstuffing), counted even past the limit
        self.too_big = False
        self.bare_newline = False
        self.done = False

    def feed(self, data: bytes) -> bytes | None:
        if self.done:
            raise RuntimeError("DATA already ended")
        work = self._tail + data
        end = work.find(TERMINATOR)
        if end >= 0:
            # The CRLF before the final dot belongs to the last line of content.
            self._emit(work[: end + 2])
            self._tail = b""
            self.done = True
            return work[end + 5 :]
        # Hold back the tail that could be the start of "<CRLF>." or the terminator:
        # from the last CRLF among the final 4 bytes, or a final lone CR.
        n = len(work)
        cut = work.rfind(_CRLF, max(0, n - 4))
        if cut < 0:
            cut = n - 1 if work.endswith(b"\r") else n
        self._tail = work[cut:]
        if cut:
            self._emit(work[:cut])
        return None

    def _emit(self, chunk: bytes) -> None:
        # Bare CR/LF check before unstuffing (unstuffing changes neither count).
        if not self.bare_newline:
            pairs = chunk.count(_CRLF)
            if chunk.count(b"\r") != pairs or chunk.count(b"\n") != pairs:
                self.bare_newline = True
        # RFC 5321 4.5.2: remove the first dot of every line that starts with one.
        # The chunk starts with CRLF or mid-line, never between CR and LF or
        # between CRLF and the dot, so this is exact.
        chunk = chunk.replace(b"\r\n.", _CRLF)
        if self._first:
            chunk = chunk[2:]  # strip the virtual CRLF
            self._first = False
        if not chunk:
            return
        self.size += len(chunk)
        if self._max_size and self.size > self._max_size:
            self.too_big = True
        if not self.too_big and not self.bare_newline:
            self._sink(chunk)


class DataEncoder:
    """Bytes of a stored message -> the DATA stream (CRLF, dot-stuffed, terminated).

    Every CR not followed by LF and every LF not preceded by CR becomes CRLF,
    so no bare CR or LF ever reaches the remote (the SMTP smuggling defence:
    a receiver that ends DATA at a bare ``<LF>.<LF>`` never sees one from us);
    NUL bytes are dropped (RFC 5321 4.5.2 allows none in text).  Then lines
    starting with "." get another "." (RFC 5321 4.5.2).  State carries across
    chunk boundaries.
    """

    def __init__(self) -> None:
        self._pending_cr = False
        self._line_start = True
        self.written = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        if b"\x00" in chunk:
            chunk = chunk.replace(b"\x00", b"")
        if b"\r" in chunk or b"\n" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        if chunk:
            self._line_start = chunk.endswith(b"\r\n")
        self.written += len(chunk)
        return chunk

    def end(self) -> bytes:
        out = b""
        if self._pending_cr:
            self._pending_cr = False
            out = b"\r\n"
            self._line_start = True
        if not self._line_start:
            out += b"\r\n"
        return out + b".\r\n"

    def encode(self, data: bytes) -> bytes:
        """Whole-message convenience (tests)."""
        return self.feed(data) + self.end()


@implementer(IMessageSource)
class MemorySource:
    """A message held in memory (a small one the queue manager preloaded)."""

    def __init__(self, data: bytes) -> None:
        self.whole: bytes | None = data
        self._offset = 0

    def read(self, size: int) -> Deferred[bytes]:
        data = self.whole or b""
        chunk = data[self._offset : self._offset + size]
        self._offset += len(chunk)
        return succeed(chunk)

    def close(self) -> None:
        self.whole = None


@implementer(IMessageSource)
class FileSource:
    """An open message file, read in the thread pool (the page cache may not
    hold a message retried hours later, and a disk read must not stall the reactor)."""

    whole = None  # read chunk by chunk

    def __init__(self, file: IO[bytes], run_blocking: Callable[..., Deferred]) -> None:
        self._file = file
        self._run_blocking = run_blocking

    def read(self, size: int) -> Deferred[bytes]:
        return self._run_blocking(self._file.read, size)

    def close(self) -> None:
        self._file.close()


class BodyStopped(Exception):
    """The transport stopped the producer (the connection went away)."""


@implementer(IPushProducer)
class BodyProducer:
    """Streams a message through a DataEncoder into the transport.

    A push producer: it reads and writes chunk after chunk until the
    transport's buffer is full and it is paused, then continues when resumed.
    One read is outstanding at a time, so at most one chunk plus the
    transport's buffer is in memory.  ``done`` fires once the final "." is
    written; it errbacks with the read error, or ``BodyStopped``.
    """

    def __init__(self, source: IMessageSource, transport: ITransport, on_chunk: Callable[[], None]) -> None:
        self.source = source
        self.transport = transport
        self.encoder = DataEncoder()
        self.on_chunk = on_chunk
        self.done: Deferred[None] = Deferred()
        self._stopped = False
        self._paused = False
        self._reading = False
        self._in_next = False

    def start(self) -> None:
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._next()

    def _next(self) -> None:
        while not (self._paused or self._reading or self._stopped):
            self.on_chunk()
            self._reading = True
            self._in_next = True
            self.source.read(CHUNK).addBoth(self._got)
            self._in_next = False
            if self._reading:
                return  # the read is in a thread; _got continues

    def _got(self, data: Any) -> None:
        self._reading = False
        if self._stopped:
            return
        if isinstance(data, Failure):
            self._finish(data)
            return
        if not data:
            self.transport.write(self.encoder.end())
            self._finish(None)
            return
        out = self.encoder.feed(data)
        if out:
            self.transport.write(out)
        if not self._in_next:
            self._next()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._next()

    def _finish(self, result: Failure | None) -> None:
        self._stopped = True
        self.transport.unregisterProducer()  # type: ignore[attr-defined]
        if self.done.called:
            return
        if result is None:
            self.done.callback(None)
        else:
            self.done.errback(result)

    def stopProducing(self) -> None:
        if not self._stopped:
            self._stopped = True
            if not self.done.called:
                self.done.errback(Failure(BodyStopped()))
