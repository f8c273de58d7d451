# -*- test-case-name: tests.smtp.test_smtp_data -*-
"""The DATA phase as a streaming decoder: bytes in, unstuffed message chunks out.

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

TERMINATOR = b"\r\n.\r\n"
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

