# -*- test-case-name: tests.pop3.test_server -*-
"""The read path of RETR and TOP (RFC 1939 section 7).

Fast path, on the reactor thread (``read_first``, ``read_ahead``): the first
``CHUNK`` of a message is read directly, because one open() and one read()
from the page cache cost less than a thread hop and most messages are that
small; after a RETR the next message is read ahead between commands (and
``pop3.server`` makes its RETR reply then), so the next RETR only sends it.
Listing ``cur/`` to find a renamed file goes to the thread pool.

The rest of a larger message goes through ``MessageSender``, a push producer
that reads ``CHUNK`` bytes at a time through ``run_blocking`` while the
transport wants more, so memory per session does not grow with message size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.pop3.mailbox import Maildrop, WireEncoder

CHUNK = 64 * 1024  # read size for RETR/TOP


def read_first(
    drop: Maildrop, i: int, run_blocking: Callable[..., Deferred]
) -> tuple[BinaryIO | None, bytes] | Deferred:
    """``drop.read_start(i, CHUNK)``: ``(open file or None if that was all, first bytes)``,
    read here; a Deferred of the same if the file must be looked for in the thread pool."""
    try:
        return drop.read_start(i, CHUNK, relocate=False)
    except FileNotFoundError:
        return run_blocking(drop.read_start, i, CHUNK)
    except Exception:
        return fail()


def read_ahead(drop: Maildrop, i: int) -> bytes | None:
    """Message ``i`` whole if it is there, undeleted, and fits in one ``CHUNK``;
    otherwise None, and any error is left for the RETR itself."""
    if i >= len(drop) or drop.deleted[i]:
        return None
    try:
        fileobj, data = drop.read_start(i, CHUNK, relocate=False)
    except Exception:
        return None
    if fileobj is not None:
        fileobj.close()
        return None
    return data


@implementer(IPushProducer)
class MessageSender:
    """Streams the rest of a message file to the transport (RETR/TOP).

    Reads ``CHUNK`` bytes at a time through ``run_blocking`` while the transport
    wants more; ``pauseProducing`` from the transport stops the reads, so at most
    one chunk plus the transport's buffer is in memory.
    """

    def __init__(
        self, transport: IConsumer, fileobj: BinaryIO, encoder: WireEncoder, run_blocking: Callable[..., Deferred]
    ) -> None:
        self._transport = transport
        self._file = fileobj
        self._encoder = encoder
        self._run_blocking = run_blocking
        self._paused = False
        self._reading = False
        self._finished = False
        self._in_next = False
        self.chunks = 0  # read so far (progress, for the autologout timer)
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._transport.registerProducer(self, True)
        self._next()
        return self.done

    def _next(self) -> None:
        while not (self._paused or self._reading or self._finished):
            self._reading = True
            self._in_next = True
            self._run_blocking(self._file.read, CHUNK).addBoth(self._got)
            self._in_next = False
            if self._reading:
                return  # the read is in a thread; _got continues

    def _got(self, data: bytes | Failure) -> None:
        self._reading = False
        if self._finished:
            self._close_file()  # stopProducing left the close to us
            return
        if isinstance(data, Failure):
            self._finish(data)
            return
        if not data:
            self._transport.write(self._encoder.end())
            self._finish(None)
            return
        self.chunks += 1
        out = self._encoder.feed(data)
        if self._encoder.done:
            self._transport.write(out + self._encoder.end())
            self._finish(None)
            return
        if out:
            self._transport.write(out)
        if not self._in_next:
            self._next()

    def _close_file(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass

    def _finish(self, result: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._close_file()
        self._transport.unregisterProducer()
        if result is None:
            self.done.callback(None)
        else:
            self.done.errback(result)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._next()

    def stopProducing(self) -> None:
        if not self._finished:
            self._finished = True
            if not self._reading:
                self._close_file()
            self.done.errback(Failure(ConnectionDone("stopped while sending a message")))
