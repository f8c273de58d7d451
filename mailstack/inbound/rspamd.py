# -*- test-case-name: tests.inbound.test_rspamd -*-
"""Ask rspamd about a message over its HTTP API (``POST /checkv2``).

The message is the request body: from memory when small, else streamed from
its file by ``ThreadedFileBodyProducer``, whose reads run in the thread pool,
so neither memory nor reactor time grows with the message.  The envelope goes
in request headers (rspamd's protocol): ``From``, one ``Rcpt`` per recipient,
``IP``, ``Helo``, ``Hostname``, ``User`` for an authenticated client,
``Queue-Id``.

The JSON reply's ``action`` becomes a decision:

=================================  ==========
rspamd action                      decision
=================================  ==========
``reject``                         refuse (550 5.7.1)
``soft reject``, ``greylist``      tempfail (451 4.7.1)
``add header``, ``rewrite subject`` tag (``X-Spam: yes`` and a score header)
``no action`` (or unknown)         accept
=================================  ==========

rspamd unreachable, an HTTP error, a reply that is not JSON, or no reply
within ``timeout`` errbacks ``RspamdUnavailable``; the caller applies
``inbound.rspamd_failure`` (tempfail or accept).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from mailstack.inbound.interfaces import IRspamdClient
from mailstack.interfaces import IMessage

ACCEPT, TAG, TEMPFAIL, REFUSE = "accept", "tag", "tempfail", "refuse"
DECISIONS = {
    "reject": REFUSE,
    "soft reject": TEMPFAIL,
    "greylist": TEMPFAIL,
    "add header": TAG,
    "rewrite subject": TAG,
    "no action": ACCEPT,
}
TIMEOUT = 30.0  # seconds for the whole exchange
IN_MEMORY = 256 * 1024  # smaller messages are sent from memory
CHUNK = 64 * 1024
MAX_REPLY = 1 << 20  # rspamd's JSON reply is a few kilobytes


class RspamdUnavailable(Exception):
    """No usable answer from rspamd (unreachable, error, timeout, garbage)."""


@dataclass(frozen=True)
class Envelope:
    """What rspamd is told about the SMTP transaction."""

    mail_from: str
    recipients: Sequence[str]
    ip: str
    helo: str
    hostname: str
    user: str = ""
    queue_id: str = ""


@dataclass(frozen=True)
class Verdict:
    """``decision`` (accept/tag/tempfail/refuse) from rspamd's ``action``;
    ``headers`` to add when tagging; ``subject`` the rewritten Subject when
    rspamd asks for one."""

    decision: str
    action: str
    score: float
    required_score: float
    symbols: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = field(default=())
    subject: str = ""


def _header_value(text: str) -> bytes:
    """A peer-supplied value made safe for an HTTP header (no CR, LF or NUL)."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text).encode("utf-8")


def verdict_from(reply: dict[str, object]) -> Verdict:
    """Map rspamd's JSON reply to a Verdict (see the module docstring)."""
    action = str(reply.get("action", "no action"))
    decision = DECISIONS.get(action, ACCEPT)
    score = float(reply.get("score", 0.0))  # type: ignore[arg-type]
    required = float(reply.get("required_score", 0.0))  # type: ignore[arg-type]
    symbols = reply.get("symbols")
    names = tuple(sorted(symbols)) if isinstance(symbols, dict) else ()
    headers: tuple[tuple[str, str], ...] = ()
    if decision == TAG:
        headers = (("X-Spam", "yes"), ("X-Spam-Score", f"{score:.2f} / {required:.2f}"))
    subject = str(reply.get("subject", "")) if action == "rewrite subject" else ""
    return Verdict(decision, action, score, required, names, headers, subject)


@implementer(IBodyProducer)
class ThreadedFileBodyProducer:
    """Streams a file to an HTTP request, each read done by ``run_blocking``.

    Twisted's own ``FileBodyProducer`` reads on the reactor thread; this one
    keeps the reactor free of disk I/O.  ``pauseProducing`` holds the next
    read until ``resumeProducing``; after ``stopProducing`` the Deferred of
    ``startProducing`` never fires (``IBodyProducer``).
    """

    def __init__(self, path: str, size: int, run_blocking: Callable[..., Deferred]) -> None:
        self.path = path
        self.length = size
        self.run_blocking = run_blocking
        self._paused: Deferred[None] | None = None
        self._stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        finished: Deferred[None] = Deferred()

        def done(result: None | Failure) -> None:
            if self._stopped:
                return
            if isinstance(result, Failure):
                finished.errback(result)
            else:
                finished.callback(None)

        Deferred.fromCoroutine(self._produce(consumer)).addBoth(done)
        return finished

    async def _produce(self, consumer: IConsumer) -> None:
        fd: int = await self.run_blocking(os.open, self.path, os.O_RDONLY)
        try:
            offset = 0
            while not self._stopped:
                if self._paused is not None:
                    await self._paused
                    continue
                chunk: bytes = await self.run_blocking(os.pread, fd, CHUNK, offset)
                if not chunk or self._stopped:
                    break
                consumer.write(chunk)
                offset += len(chunk)
        finally:
            await self.run_blocking(os.close, fd)

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()


class MessageBodyProducer(ThreadedFileBodyProducer):
    """Streams an ``IMessage`` (the pipeline's view of a message being received)
    chunk by chunk, each read done through ``message.run_blocking``."""

    def __init__(self, message: IMessage) -> None:
        super().__init__("", message.size, message.run_blocking)
        self.message = message

    async def _produce(self, consumer: IConsumer) -> None:
        offset = 0
        while not self._stopped:
            if self._paused is not None:
                await self._paused
                continue
            chunk: bytes = await self.message.run_blocking(functools.partial(_chunk_at, offset))
            if not chunk or self._stopped:
                break
            consumer.write(chunk)
            offset += len(chunk)


def _chunk_at(offset: int, f: IO[bytes]) -> bytes:
    f.seek(offset, os.SEEK_CUR)
    return f.read(CHUNK)


class _BoundedBody(Protocol):
    """Collects a response body of at most MAX_REPLY bytes."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_REPLY:
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.size > MAX_REPLY:
            self.done.errback(RspamdUnavailable("reply too large"))
        elif reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(RspamdUnavailable(f"reply cut short: {reason.getErrorMessage()}"))


@implementer(IRspamdClient)
class RspamdClient:
    """``scan(message, envelope)``: ``message`` is a file path or bytes."""

    def __init__(
        self,
        url: str,
        agent: IAgent,
        clock: IReactorTime,
        run_blocking: Callable[..., Deferred],
        timeout: float = TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self.agent = agent
        self.clock = clock
        self.run_blocking = run_blocking
        self.timeout = timeout

    def scan(self, message: str | bytes | IMessage, envelope: Envelope) -> Deferred[Verdict]:
        """Deferred Verdict; errbacks RspamdUnavailable.  ``message``: a file
        path, small bytes, or an ``IMessage`` read through its ``run_blocking``."""
        d = Deferred.fromCoroutine(self._scan(message, envelope))
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(self._unavailable)
        return d

    @staticmethod
    def _unavailable(failure: Failure) -> Failure:
        if failure.check(RspamdUnavailable):
            return failure
        if failure.check(TimeoutError, CancelledError):
            raise RspamdUnavailable("no reply in time")
        raise RspamdUnavailable(failure.getErrorMessage() or repr(failure.value))

    def _headers(self, envelope: Envelope) -> Headers:
        headers = Headers({b"User-Agent": [b"mailstack"]})
        headers.setRawHeaders(b"From", [_header_value(envelope.mail_from)])
        headers.setRawHeaders(b"Rcpt", [_header_value(r) for r in envelope.recipients])
        headers.setRawHeaders(b"IP", [_header_value(envelope.ip)])
        headers.setRawHeaders(b"Helo", [_header_value(envelope.helo)])
        headers.setRawHeaders(b"Hostname", [_header_value(envelope.hostname)])
        if envelope.user:
            headers.setRawHeaders(b"User", [_header_value(envelope.user)])
        if envelope.queue_id:
            headers.setRawHeaders(b"Queue-Id", [_header_value(envelope.queue_id)])
        return headers

    async def _body(self, message: str | bytes | IMessage) -> IBodyProducer:
        if isinstance(message, bytes):
            return _MemoryBody(message)
        if not isinstance(message, str):
            if message.size <= IN_MEMORY:
                return _MemoryBody(await message.run_blocking(lambda f: f.read()))
            return MessageBodyProducer(message)
        size: int = (await self.run_blocking(os.stat, message)).st_size
        if size <= IN_MEMORY:
            with_data: bytes = await self.run_blocking(_read, message)
            return _MemoryBody(with_data)
        return ThreadedFileBodyProducer(message, size, self.run_blocking)

    async def _scan(self, message: str | bytes | IMessage, envelope: Envelope) -> Verdict:
        body = await self._body(message)
        response: IResponse = await self.agent.request(
            b"POST", (self.url + "/checkv2").encode("ascii"), self._headers(envelope), body
        )
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_BoundedBody(done))
        raw = await done
        if response.code != 200:
            raise RspamdUnavailable(f"HTTP {response.code}")
        try:
            reply = json.loads(raw)
        except ValueError:
            raise RspamdUnavailable("reply is not JSON") from None
        if not isinstance(reply, dict):
            raise RspamdUnavailable("reply is not a JSON object")
        return verdict_from(reply)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@implementer(IBodyProducer)
class _MemoryBody:
    """A small body written at once (FileBodyProducer would need a cooperator)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

