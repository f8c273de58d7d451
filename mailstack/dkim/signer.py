# -*- test-case-name: tests.dkimsign.test_signer -*-
"""What a pipeline stage calls to sign a message: the From domain's active keys, if it is local.

The stage streams the body through ``canon.BodyHash`` (in the thread pool,
with the rest of the message's disk work), then calls
``signer.fields(headers, body_hash, now)`` and writes the returned fields at
the top of the stored message.  Only mail from authenticated sessions and
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

    def sign_message(self, message: bytes, now: float) -> bytes:
        head, _, body = message.partition(b"\r\n\r\n")
        body_hash = BodyHash()
        body_hash.feed(body)
        return b"".join(self.fields(header_fields(head + b"\r\n"), body_hash.digest(), now)) + message
