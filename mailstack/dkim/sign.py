# -*- test-case-name: tests.dkimsign.test_sign -*-
"""DKIM-Signature header fields (RFC 6376) for a message, with ``cryptography``.

A pipeline stage hashes the body while it streams (``canon.BodyHash``), then
calls ``sign(headers, body_hash, keys, now)`` and puts the returned fields on
top of the stored message, so a retry never signs again.  Signing the header
hash costs well under a millisecond per key (the expensive part, hashing the
body, is already done), so it may run on the reactor thread.

Every signature is relaxed/relaxed with ``t=`` (RFC 6376 section 3.5) and no
``l=`` (a body length limit lets anyone append content that still verifies).
``rsa-sha256`` uses RSASSA-PKCS1-v1_5 (RFC 6376 section 3.3.1);
``ed25519-sha256`` signs the SHA-256 hash of the header data with PureEdDSA
(RFC 8463 section 3).

Signed header fields (``SIGNED``): the ones a receiver shows or acts upon,
including List-Unsubscribe and List-Unsubscribe-Post, which RFC 8058 section 4
requires to be covered.  Each is signed as often as it occurs; From is named
once more than it occurs (oversigned, RFC 6376 section 8.15), so a From field
added in transit breaks the signature instead of being shown to the reader.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from mailstack.address import AddressError, normalize_domain
from mailstack.dkim.canon import HeaderField, relaxed_header, selected

SIGNED = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
OVERSIGNED = ("from",)
CACHED_FROM = 256  # From fields up to this many bytes have their author domain remembered

ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}

PrivateKey = RSAPrivateKey | Ed25519PrivateKey


@dataclass(frozen=True)
class SigningKey:
    """One active key: ``d=`` domain (A-label), ``s=`` selector, "rsa" or "ed25519"."""

    domain: str
    selector: str
    algorithm: str
    private_key: PrivateKey


def signed_names(headers: Sequence[HeaderField]) -> list[str]:
    """The ``h=`` list: each present field of ``SIGNED`` once per occurrence,
    plus one more for each ``OVERSIGNED`` field."""
    present = [name.lower() for name, _ in headers]
    names: list[str] = []
    for name in SIGNED:
        count = present.count(name)
        if count or name in OVERSIGNED:
            names += [name] * (count + (name in OVERSIGNED))
    return names


def _selected(headers: Sequence[HeaderField], names: Sequence[str]) -> bytes:
    """The relaxed canonical header data in ``h=`` order (``canon.selected``)."""
    return b"".join(relaxed_header(raw) for raw in selected(headers, names))


def _fold_tags(tags: Sequence[bytes]) -> bytes:
    """``DKIM-Signature: tag; tag;...`` folded before a tag that would pass 76 columns."""
    lines = [b"DKIM-Signature: " + tags[0] + b";"]
    for tag in tags[1:]:
        if len(lines[-1]) + 1 + len(tag) + 1 > 76:
            lines.append(b"\t" + tag + b";")
        else:
            lines[-1] += b" " + tag + b";"
    return b"\r\n".join(lines)


def _fold_b64(value: bytes, first: int) -> bytes:
    """The ``b=`` value in lines of 72 columns (FWS inside base64 is allowed
    and ignored, RFC 6376 section 3.5)."""
    parts = [value[: max(first, 0)]]
    rest = value[max(first, 0) :]
    while rest:
        parts.append(rest[:70])
        rest = rest[70:]
    return b"\r\n\t".join(p for p in parts if p)


def _signature(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key.private_key, RSAPrivateKey):
        return key.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.private_key.sign(hashlib.sha256(data).digest())


def sign_one(headers: Sequence[HeaderField], body_hash: bytes, key: SigningKey, now: int) -> bytes:
    """One ``DKIM-Signature:`` field (ending in CRLF) for ``key``."""
    names = signed_names(headers)
    tags = [
        b"v=1",
        b"a=" + ALGORITHMS[key.algorithm],
        b"c=relaxed/relaxed",
        b"d=" + key.domain.encode("ascii"),
        b"s=" + key.selector.encode("ascii"),
        b"t=%d" % now,
        b"h=" + ":".join(names).encode("ascii"),
        b"bh=" + base64.b64encode(body_hash),
    ]
    unsigned = _fold_tags(tags) + b"\r\n\tb="
    # RFC 6376 section 3.7: the signed data is the selected fields, then this
    # field with an empty b= value, canonicalized, without its final CRLF.
    data = _selected(headers, names) + relaxed_header(unsigned)[:-2]
    value = base64.b64encode(_signature(key, data))
    return unsigned + _fold_b64(value, 72 - len(b"\tb=")) + b"\r\n"


def sign(headers: Sequence[HeaderField], body_hash: bytes, keys: Sequence[SigningKey], now: int) -> list[bytes]:
    """One ``DKIM-Signature:`` field per key, each independent of the others.

    ``headers`` are the message's fields as ``(name, raw)`` pairs in order
    (``canon.header_fields``); ``body_hash`` is ``canon.BodyHash().digest()``;
    ``now`` is the signing time in seconds since the epoch (``t=``).
    """
    return [sign_one(headers, body_hash, key, now) for key in keys]


def author_domain(headers: Sequence[HeaderField]) -> str | None:
    """The domain of the RFC 5322 From address (lowercase A-label), which picks
    the signing keys; None unless there is exactly one From field with exactly
    one address (RFC 7489 section 6.6.1: anything else has no author domain)."""
    froms = [raw for name, raw in headers if name.lower() == "from"]
    if len(froms) != 1:
        return None
    # A submitting account sends with the same From again and again, and the
    # address parser is a good part of the signing's cost besides the
    # signature itself: remembered, for fields of a usual size only.
    return (_cached_from_domain if len(froms[0]) <= CACHED_FROM else _from_domain)(froms[0])


def _from_domain(raw: bytes) -> str | None:
    """``author_domain`` of one From field."""
    value = raw.partition(b":")[2].decode("utf-8", "replace")
    addresses = [a for _, a in email.utils.getaddresses([value]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    try:
        return normalize_domain(addresses[0].rpartition("@")[2].strip())
    except AddressError:
        return None


_cached_from_domain = functools.lru_cache(maxsize=1024)(_from_domain)
