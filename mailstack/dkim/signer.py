# -*- test-case-name: tests.dkimsign.test_signer -*-
"""What a pipeline stage calls to sign a message: the From domain's active keys, if it is local.

The stage streams the body through ``canon.BodyHash``, then calls
``signer.loaded_fields(headers, body_hash, now)`` on the reactor thread, or
``signer.fields`` in the thread pool when a key file must be read first, and
writes the returned fields at the top of the stored message.  One RSA-2048
signature costs ~0.3 ms of CPU, and ``cryptography`` holds the GIL while it
signs, so a pool thread would not spare the reactor that time; it would only
add a round trip queued behind the queue's fsyncs to each message.  Only mail from authenticated sessions and
mail the server writes itself may be signed; the stage decides that, the
signer only picks the keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zope.interface import Interface, implementer

from mailstack.dkim.canon import BodyHash, HeaderField, header_fields
from mailstack.dkim.keys import KeyStore
from mailstack.dkim.sign import author_domain, sign


class IDKIMSigner(Interface):
    """DKIM-Signature fields for an outgoing message."""

    def fields(headers: Sequence[HeaderField], body_hash: bytes, now: float) -> list[bytes]:
        """One field (CRLF-terminated) per active key of the RFC 5322 From
        domain when it is local; an empty list otherwise.  Blocking only for a
        stat of the key index (and key file reads after a change)."""

    def loaded_fields(headers: Sequence[HeaderField], body_hash: bytes, now: float) -> list[bytes] | None:
        """As ``fields``, reading no file (stats of the index and key files
        only; the index is re-read after an admin change, as the users file
        is); None when a key file must be read first: then call ``fields`` in
        the thread pool."""

    def sign_message(message: bytes, now: float) -> bytes:
        """A small message held in memory (a DSN we wrote), with its
        signature fields on top; unchanged when ``fields`` gives none.
        Blocking (hashes the body): call it in the thread pool."""


@implementer(IDKIMSigner)
class DKIMSigner:
    """Signs with ``keys`` for the domains ``is_local`` accepts."""

    def __init__(self, keys: KeyStore, is_local: Callable[[str], bool]) -> None:
        self.keys = keys
        self.is_local = is_local

    def fields(self, headers: Sequence[HeaderField], body_hash: bytes, now: float) -> list[bytes]:
        domain = author_domain(headers)
        if domain is None or not self.is_local(domain):
            return []
        return sign(headers, body_hash, self.keys.active(domain), int(now))

    def loaded_fields(self, headers: Sequence[HeaderField], body_hash: bytes, now: float) -> list[bytes] | None:
        domain = author_domain(headers)
        if domain is None or not self.is_local(domain):
            return []
        keys = self.keys.loaded(domain)
        return None if keys is None else sign(headers, body_hash, keys, int(now))

    def sign_message(self, message: bytes, now: float) -> bytes:
        head, _, body = message.partition(b"\r\n\r\n")
        body_hash = BodyHash()
        body_hash.feed(body)
        return b"".join(self.fields(header_fields(head + b"\r\n"), body_hash.digest(), now)) + message
