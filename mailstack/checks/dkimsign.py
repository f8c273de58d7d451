# -*- test-case-name: tests.dkimsign.test_check -*-
"""DKIM signing and submission hygiene for mail from authenticated sessions.

Runs for submission sessions only (``mx = False``): mail arriving
unauthenticated on the MX listener, an alias forwarding it to a remote
address included, is never signed with our keys.

While the message streams, an observer skips the header section and feeds
the body to ``dkim.canon.BodyHash`` (RFC 6376 section 3.4.4, relaxed).
Canonicalizing text costs about 11 ms per MB (base64 about 2 ms/MB), too
much for the reactor thread, so the body goes to the thread pool in batches
of ``BATCH`` bytes, one batch at a time, in order.  At most ``BACKLOG`` bytes
wait for the pool: a client that sends faster than the pool hashes switches
the message to hashing its stored copy in one thread call at the end of
data, so memory stays bounded.  A body of at most ``INLINE`` bytes (most
submitted mail) is hashed on the reactor thread at the end of data instead
(a few tenths of a millisecond): a pool call would wait behind the queue's
fsyncs, which costs the client more time than the hashing.

At end of data:

1. ``Date:`` and ``Message-ID: <unique@hostname>`` are added when missing
   (RFC 6409 section 8.2 and 8.3; ``hygiene.missing_fields``); present ones
   are never changed.
2. The header fields as they will be stored (the added ones included) are
   signed with every active key of the RFC 5322 From domain when that domain
   is local (``dkim.signer``), on the reactor thread (~0.3 ms per RSA-2048
   key) once the key files are loaded; reading a key file runs in the pool.
3. The ``Verdict`` prepends the signatures, then the added fields; our
   ``Received:`` stays first.

Put this check last in ``[pipeline] checks``: a field a later check adds to
the signed set (From, Subject, ...) would break the signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailstack import hygiene
from mailstack.dkim.canon import BodyHash
from mailstack.dkim.signer import IDKIMSigner
from mailstack.headers import Field, HeaderReader, field_name
from mailstack.interfaces import IMessage, IMessageObserver
from mailstack.pipeline import Check, CheckFactory, Connection, Transaction, Verdict
from mailstack.threadpool import INLINE_BYTES

BATCH = 256 * 1024  # bytes per thread call
BACKLOG = 4 * 1024 * 1024  # bytes waiting for the pool before the stored copy is hashed instead
INLINE = INLINE_BYTES  # a body up to this size is hashed on the reactor thread
_READ = 1 << 20


class BodyStream:
    """Feeds the body of a message streamed through ``feed`` to ``sink``.

    The header section ends as the intake's ``headers.HeaderReader`` says
    (so both agree on where the stored body starts); the empty line that
    ends it is not part of the body (RFC 6376 section 3.4.4 hashes what
    follows it).  Header bytes are held only until the section ends, at most
    ``headers.HEADER_LIMIT`` plus one chunk.
    """

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._reader = HeaderReader()
        self._head = bytearray()

    def feed(self, data: bytes) -> None:
        if self._reader.done:
            if not self._reader.overflow:
                self._sink(data)
            return
        self._head += data
        self._reader.feed(data)
        if self._reader.done:
            self._release()

    def end(self) -> None:
        """The message is complete (a message without a body ends in its header section)."""
        if not self._reader.done:
            self._reader.end()
            self._release()

    def _release(self) -> None:
        head, self._head = self._head, bytearray()
        if self._reader.overflow:
            return  # the intake refuses it (552 5.3.4)
        start = self._reader.length
        if head[start : start + 2] == b"\r\n":
            start += 2
        if len(head) > start:
            self._sink(bytes(head[start:]))


def hash_stored(f: IO[bytes]) -> bytes:
    """Blocking: the body hash of a message read from ``f`` (client bytes)."""
    body = BodyHash()
    stream = BodyStream(body.feed)
    while chunk := f.read(_READ):
        stream.feed(chunk)
    stream.end()
    return body.digest()


@implementer(IMessageObserver)
class BodyObserver:
    """Hashes the body of a message as it streams, in the thread pool (module docstring)."""

    def __init__(self, run_blocking: Callable[..., Deferred]) -> None:
        self._run_blocking = run_blocking
        self._hash = BodyHash()
        self._stream = BodyStream(self._collect)
        self._batch: list[bytes] = []
        self._batched = 0  # bytes in _batch
        self._waiting = 0  # bytes handed to the pool, not yet hashed
        self._chain: Deferred = succeed(None)
        self._submitted = False  # a batch went to the pool
        self.overflowed = False  # hash the stored copy instead

    def write(self, data: bytes) -> None:
        if not self.overflowed:
            self._stream.feed(data)

    def _collect(self, data: bytes) -> None:
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= BATCH:
            self._submit()

    def _submit(self) -> None:
        if self._waiting + self._batched > BACKLOG:
            self.overflowed = True
            self._batch, self._batched = [], 0
            return
        batch, size = b"".join(self._batch), self._batched
        self._batch, self._batched = [], 0
        self._waiting += size
        self._submitted = True

        def hashed(_: object) -> Deferred:
            d = self._run_blocking(self._hash.feed, batch)
            d.addCallback(self._done, size)
            return d

        self._chain.addCallback(hashed)

    def _done(self, _: object, size: int) -> None:
        self._waiting -= size

    def digest(self, message: IMessage) -> Deferred:
        """Fires with the body hash once every batch is hashed (or the stored copy is)."""
        if self.overflowed:
            return message.run_blocking(hash_stored)
        self._stream.end()
        rest = b"".join(self._batch)
        self._batch = []
        if not self._submitted and len(rest) <= INLINE:
            return succeed(self._final(rest))
        self._chain.addCallback(lambda _: self._run_blocking(self._final, rest))
        return self._chain

    def _final(self, rest: bytes) -> bytes:
        self._hash.feed(rest)
        return self._hash.digest()


class DKIMSignCheck(Check):
    """Adds missing Date/Message-ID and DKIM signatures to submitted mail."""

    name = "dkimsign"
    mx = False
    submission = True

    def __init__(self, signer: IDKIMSigner, run_blocking: Callable[..., Deferred], clock: Any) -> None:
        self.signer = signer
        self.run_blocking = run_blocking
        self.clock = clock

    def data_begin(self, conn: Connection, txn: Transaction) -> IMessageObserver:
        observer = BodyObserver(self.run_blocking)
        txn.notes[self.name] = observer
        return observer

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> Deferred:
        observer: BodyObserver = txn.notes.pop(self.name)
        now = self.clock.seconds()
        added = hygiene.missing_fields(message.header, conn.hostname, now)
        # Only the order of fields of one name matters to DKIM, and the added
        # names are absent from the header: put them first, as stored.
        fields: Sequence[Field] = [*((field_name(raw), raw) for raw in added), *message.header]

        def sign(body_hash: bytes) -> list[bytes] | Deferred:
            signatures = self.signer.loaded_fields(fields, body_hash, now)
            if signatures is None:  # a key file to read first
                return self.run_blocking(self.signer.fields, fields, body_hash, now)
            return signatures

        d = observer.digest(message)
        d.addCallback(sign)
        d.addCallback(lambda signatures: Verdict(prepend=(*signatures, *added)))
        return d


def build(runtime: Any, options: Mapping[str, Any]) -> DKIMSignCheck:
    """No options.  Signs with ``runtime.signer``, the server's one signer
    (shared with the bounces)."""
    if options:
        raise ValueError(f"unknown option {min(options)!r}")
    return DKIMSignCheck(runtime.signer, runtime.run_blocking, runtime.reactor)


factory = CheckFactory("dkimsign", build)
