# -*- test-case-name: tests.inbound.test_dkimfast -*-
"""A fast DKIM check for ordinary signatures, with ``cryptography``; only its
"pass" counts.

dkimpy verifies in pure Python (regular expressions over the whole message,
its own ASN.1 and RSA code): ~0.6 ms of CPU per signed message, holding the
GIL.  Most signatures are ordinary, and for those this module hashes the body
while streaming it (``canon.BodyHash`` / ``canon.SimpleBodyHash``), builds
the header hash input (RFC 6376 sections 3.7 and 5.4.2) and checks the
signature with ``cryptography`` (RSASSA-PKCS1-v1_5 SHA-256, RFC 6376 section
3.3.1; Ed25519 over the SHA-256 of that input, RFC 8463 section 3).

It answers only "pass" or "not known": a signature it does not take, or that
does not verify here, goes to dkimpy, which decides every other result
(fail, neutral, permerror, temperror) as before.  So this check must never
pass what dkimpy would not: it takes a signature only when dkimpy's own tag
checks (``validate_signature_fields``) and key parse (the caller's
``evaluate_pk``) accept it, hashes exactly the bytes dkimpy hashes, and is
stricter everywhere else:

- the message: CRLF line endings only, no bare CR, no vertical tab or form
  feed in the header (where dkimpy's canonicalization strips more than WSP),
  every header line a ``name:`` of printable characters or a continuation,
  an empty line ending the header;
- the signature: ``v=1``, ``a=rsa-sha256`` or ``ed25519-sha256``, ``c=``
  simple or relaxed for both parts, no ``l=``, ``h=`` naming From, ``x=``
  (if any) not passed, ``t=`` (if any) at most ``CLOCK_SLACK`` ahead;
- the key record (RFC 6376 section 3.6.1): ``v=DKIM1`` if present, ``k=``
  matching ``a=``, ``h=`` (if any) allowing sha256, service ``*`` or
  ``email``, with ``t=s`` the ``i=`` domain equal to ``d=``, and a key
  ``cryptography`` loads (RSA of at least ``MIN_RSA_BITS``, RFC 8301
  section 3.2).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key
from dkim import RE_BTAG, validate_signature_fields
from dkim.util import parse_tag_value

from mailstack.dkim.canon import BodyHash, HeaderField, SimpleBodyHash, header_fields, relaxed_header, selected

MIN_RSA_BITS = 1024  # RFC 8301 section 3.2
CLOCK_SLACK = 300  # seconds a signer's clock may be ahead (t=)
CHUNK = 65536
KEY_CACHE = 1024  # parsed public keys remembered (public data)...
CACHED_RECORD = 2048  # ...for records at most this long (an RSA-8192 key record is ~1.4 KB)

_ALGORITHMS = {b"rsa-sha256": b"rsa", b"ed25519-sha256": b"ed25519"}
_CANONS = (b"simple", b"relaxed")
# RFC 5322 section 2.2: a field name is printable US-ASCII except the colon.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_H_SPLIT = re.compile(rb"\s*:\s*")
_SPACE = re.compile(rb"\s+")
_B_START = re.compile(rb"[;\s]b\s*=")  # where dkimpy's RE_BTAG can match
_B_VALUE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \t\r\n\x0b\x0c"

PublicKey = RSAPublicKey | Ed25519PublicKey


@dataclass(frozen=True)
class _Plan:
    """One signature the fast path takes: what to hash and what to compare."""

    body_canon: bytes
    body_hash: bytes
    data: bytes  # the header hash input
    signature: bytes
    key: PublicKey

    def verifies(self) -> bool:
        try:
            if isinstance(self.key, RSAPublicKey):
                self.key.verify(self.signature, self.data, padding.PKCS1v15(), hashes.SHA256())
            else:
                self.key.verify(self.signature, hashlib.sha256(self.data).digest())
        except InvalidSignature:
            return False
        return True


def passes(block: bytes, f: IO[bytes], records: dict[str, bytes], count: int, now: float) -> list[bool]:
    """Blocking: for each of the first ``count`` DKIM-Signature fields of the
    message, True when it passes here (final), False when dkimpy must decide.

    ``block`` is the header up to and including the empty line, ``f`` is at
    the start of the body (read to its end in ``CHUNK`` pieces, so memory does
    not grow with the message); ``records`` maps ``<s>._domainkey.<d>.``
    (lowercase) to key records dkimpy can parse."""
    return passes_fields(plain_fields(block), f, records, count, now)


def passes_fields(
    fields: list[HeaderField] | None, f: IO[bytes], records: dict[str, bytes], count: int, now: float
) -> list[bool]:
    """``passes`` for the header already parsed: ``plain_fields(block)``."""
    if fields is None:
        return [False] * count
    raws = [raw for name, raw in fields if name.lower() == "dkim-signature"][:count]
    plans = [_plan(fields, raw, records, now) for raw in raws]
    plans += [None] * (count - len(plans))
    canons = {p.body_canon for p in plans if p is not None}
    if not canons:
        return [False] * count
    hashers: dict[bytes, BodyHash | SimpleBodyHash] = {
        c: BodyHash() if c == b"relaxed" else SimpleBodyHash() for c in canons
    }
    crs = lfs = crlfs = 0
    tail = b""
    for chunk in iter(functools.partial(f.read, CHUNK), b""):
        crs += chunk.count(b"\r")
        lfs += chunk.count(b"\n")
        crlfs += chunk.count(b"\r\n") + (tail.endswith(b"\r") and chunk.startswith(b"\n"))
        tail = (tail + chunk)[-2:]
        for h in hashers.values():
            h.feed(chunk)
    # Bare CR or LF, or a last line without CRLF (where dkimpy keeps the
    # trailing WSP that relaxed canonicalization drops): dkimpy decides.
    if not crs == lfs == crlfs or tail not in (b"", b"\r\n"):
        return [False] * count
    digests = {c: h.digest() for c, h in hashers.items()}
    return [p is not None and p.body_hash == digests[p.body_canon] and p.verifies() for p in plans]


def plain_fields(block: bytes) -> list[HeaderField] | None:
    """The header fields of ``block``, or None when it is anything but plain
    (see the module docstring), so that dkimpy's parse and ours agree."""
    if not block.endswith(b"\r\n"):
        return None
    head = block[:-2]
    crlfs = head.count(b"\r\n")
    if head.count(b"\n") != crlfs or head.count(b"\r") != crlfs or b"\x0b" in head or b"\x0c" in head:
        return None
    if head and not head.endswith(b"\r\n"):
        return None  # no empty line: the header was cut short
    fields = header_fields(head)
    if any(_FIELD_START.match(raw) is None for _, raw in fields):
        return None
    return fields


def _plan(fields: Sequence[HeaderField], raw: bytes, records: dict[str, bytes], now: float) -> _Plan | None:
    """The checks for the signature field ``raw``, or None if it is not ordinary."""
    name, _, value = raw.partition(b":")
    try:
        tags = parse_tag_value(value)  # on the folded value, as dkimpy does
        validate_signature_fields(tags)
        return _ordinary(fields, name, value, tags, records, now)
    except Exception:  # noqa: BLE001  (any trouble at all: dkimpy decides)
        return None


def _ordinary(
    fields: Sequence[HeaderField],
    name: bytes,
    value: bytes,
    tags: dict[bytes, bytes],
    records: dict[str, bytes],
    now: float,
) -> _Plan | None:
    # RFC 6376 section 3.5 tags; validate_signature_fields checked presence and syntax.
    ktype = _ALGORITHMS.get(tags[b"a"])
    canons = tags.get(b"c", b"simple/simple").split(b"/")
    if len(canons) == 1:
        canons.append(b"simple")
    if tags[b"v"] != b"1" or ktype is None or b"l" in tags or len(canons) != 2:
        return None
    header_canon, body_canon = canons
    if header_canon not in _CANONS or body_canon not in _CANONS:
        return None
    if b"x" in tags and int(tags[b"x"]) < now:
        return None
    if b"t" in tags and int(tags[b"t"]) > now + CLOCK_SLACK:
        return None
    names = [n.lower().decode("ascii") for n in _H_SPLIT.split(tags[b"h"])]
    if "from" not in names:
        return None
    domain = tags[b"d"].decode("ascii").lower()
    record = records.get(f"{tags[b's'].decode('ascii')}._domainkey.{domain}.".lower())
    key = None if record is None else (public_key if len(record) <= CACHED_RECORD else _public_key)(record, ktype)
    if key is None:
        return None
    pub, strict = key
    if strict and b"i" in tags and tags[b"i"].rpartition(b"@")[2].decode("ascii").lower() != domain:
        return None  # RFC 6376 section 3.6.1, t=s: no subdomain in i=
    # dkimpy adds one more "from", so that a From field added above the
    # signed one breaks the signature.
    chosen = selected(fields, [*names, "from"])
    unsigned = without_b(value)
    if header_canon == b"relaxed":
        data = b"".join(relaxed_header(r) for r in chosen) + relaxed_header(name + b":" + unsigned)[:-2]
    else:
        data = b"".join(chosen) + name + b":" + unsigned.rstrip()
    return _Plan(
        body_canon,
        base64.b64decode(_SPACE.sub(b"", tags[b"bh"])),
        data,
        base64.b64decode(_SPACE.sub(b"", tags[b"b"])),
        pub,
    )


def without_b(value: bytes) -> bytes:
    """The signature field's value with the ``b=`` value emptied (RFC 6376
    section 3.7), exactly as dkimpy's ``RE_BTAG`` does it.

    That expression allows folding whitespace before every base64 character,
    which makes it slow on a 2048-bit signature; in the usual case (one
    ``b=``, followed by base64 and whitespace only) it removes the value up to
    its last base64 character, and a line end that ends the field."""
    starts = _B_START.findall(value)
    if len(starts) != 1:
        return RE_BTAG.sub(rb"\1", value)
    at = value.find(starts[0]) + len(starts[0])
    rest = value[at:]
    if rest.translate(None, _B_VALUE):
        return RE_BTAG.sub(rb"\1", value)
    tail = rest[len(rest.rstrip()) :]
    return value[:at] + (b"" if tail in (b"\r\n", b"\n") else tail)


def _public_key(record: bytes, ktype: bytes) -> tuple[PublicKey, bool] | None:
    """The key of ``record`` if it is usable for a signature of type
    ``ktype`` (RFC 6376 section 3.6.1), and whether it has ``t=s``."""
    try:
        tags = parse_tag_value(record)
    except Exception:  # noqa: BLE001
        return None
    hash_algs = [h.strip() for h in tags.get(b"h", b"sha256").split(b":")]
    flags = [t.strip() for t in tags.get(b"t", b"").split(b":")]
    if (
        tags.get(b"v", b"DKIM1") != b"DKIM1"
        or tags.get(b"k", b"rsa") != ktype
        or tags.get(b"s", b"*") not in (b"*", b"email")
        or b"sha256" not in hash_algs
    ):
        return None
    try:
        raw = base64.b64decode(tags[b"p"])
        pub: PublicKey
        if ktype == b"ed25519":
            pub = Ed25519PublicKey.from_public_bytes(raw)
        else:
            loaded = load_der_public_key(raw)
            if not isinstance(loaded, RSAPublicKey) or loaded.key_size < MIN_RSA_BITS:
                return None
            pub = loaded
    except Exception:  # noqa: BLE001  (missing, empty or unparsable p=)
        return None
    return pub, b"s" in flags


public_key: Callable[[bytes, bytes], tuple[PublicKey, bool] | None] = functools.lru_cache(maxsize=KEY_CACHE)(
    _public_key
)
