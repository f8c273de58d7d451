# -*- test-case-name: tests.inbound.test_dkimverify -*-
"""DKIM verification of a stored message: every DKIM-Signature (RFC 6376,
Ed25519 per RFC 8463), with dkimpy doing the cryptography.

Three steps, so the reactor thread never reads the message nor hashes it:

1. in the thread pool: read the header block only (at most
   ``MAX_HEADER_BYTES``) and take ``d=`` and ``s=`` of each signature;
2. on the reactor: fetch each ``<s>._domainkey.<d>`` TXT record with
   twisted.names (RFC 6376 section 3.6.2.1), all in parallel;
3. in the thread pool: stream the message through the fast check of
   ``dkimfast`` (``cryptography``, ordinary signatures only; its "pass" is
   final), then, for every signature it did not pass, read the message and
   run ``dkim.DKIM.verify`` with a ``dnsfunc`` answering from the records of
   step 2.  So dkimpy decides every result other than pass, as it did alone.

Results per signature, in header order, with the RFC 8601 section 2.7.1
vocabulary: ``pass``; ``fail`` (bad signature or body hash); ``neutral`` (a
signature that cannot be parsed or processed); ``permerror`` (no key record,
a malformed or unusable key: RFC 6376 section 6.1.2); ``temperror`` (the key
lookup failed temporarily).  At most ``MAX_SIGNATURES`` are checked (RFC 6376
section 6.1 lets a verifier bound its work); further ones are neutral.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IResolver
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from mailstack.dkim.canon import HeaderField
from mailstack.inbound.dkimfast import CACHED_RECORD, passes_fields, plain_fields
from mailstack.inbound.dnsutil import DNS_TIMEOUT, lookup, txt_strings, valid_name
from mailstack.inbound.interfaces import IDKIMVerifier

MAX_SIGNATURES = 10
MAX_HEADER_BYTES = 1 << 20
MIN_RSA_BITS = 1024  # RFC 8301 section 3.2: verifiers MUST NOT consider shorter keys valid
KEY_CACHE = 1024  # key records whose parse outcome is remembered (public data, up to CACHED_RECORD long)

PASS, FAIL, NEUTRAL, PERMERROR, TEMPERROR = "pass", "fail", "neutral", "permerror", "temperror"


@dataclass(frozen=True)
class DKIMResult:
    """One signature's outcome; ``domain``/``selector`` are its ``d=``/``s=``
    (empty when unreadable), ``b`` the first characters of its ``b=`` (RFC 6008,
    to tell two signatures of one domain apart in Authentication-Results)."""

    result: str
    domain: str
    selector: str
    b: str = ""
    reason: str = ""


@dataclass(frozen=True)
class _Signature:
    domain: str
    selector: str
    b: str
    error: str  # non-empty: the signature could not be parsed


@dataclass(frozen=True)
class _Scan:
    """The header section as ``read_signatures`` found it, kept for ``verify_file``."""

    signatures: list[_Signature]
    block: bytes  # the header section up to and including the empty line
    fields: list[HeaderField] | None  # plain_fields(block)


def read_signatures(f: IO[bytes]) -> _Scan:
    """Blocking: the DKIM-Signature fields of the message read from ``f``, in order."""
    block = _header_block(f)
    fields = plain_fields(block)
    if fields is None:
        headers, _ = dkim.rfc822_parse(block)
    else:  # the same fields, found without dkimpy's regular expressions
        headers = [raw.split(b":", 1) for _, raw in fields]
    out: list[_Signature] = []
    for name, value in headers:
        if name.lower() != b"dkim-signature":
            continue
        unfolded = re.sub(rb"\r?\n[ \t]", b" ", value)
        try:
            tags = parse_tag_value(unfolded)
        except InvalidTagValueList as e:
            out.append(_Signature("", "", "", f"bad tag list: {e}"))
            continue
        d = tags.get(b"d", b"").decode("ascii", "replace").lower()
        s = tags.get(b"s", b"").decode("ascii", "replace")
        b = re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace")
        if not d or not s or not valid_name(f"{s}._domainkey.{d}"):
            out.append(_Signature(d, s, b, "missing or invalid d= or s="))
        else:
            out.append(_Signature(d, s, b, ""))
    return _Scan(out, block, fields)


def _header_block(f: IO[bytes]) -> bytes:
    """The message's header fields, up to and including the empty line."""
    chunks: list[bytes] = []
    size = 0
    for line in f:
        chunks.append(line)
        size += len(line)
        if line in (b"\r\n", b"\n") or size > MAX_HEADER_BYTES:
            break
    return b"".join(chunks)


def verify_file(
    f: IO[bytes], keys: dict[str, bytes | None], count: int, scan: _Scan | None = None
) -> list[tuple[str, str]]:
    """Blocking: (result, reason) for the first ``count`` signatures of the
    message read from ``f``; ``keys`` maps ``<s>._domainkey.<d>.`` to the key
    record (None: no record).  Names missing from ``keys`` are temperror.
    ``scan``: ``read_signatures`` of the same message, whose header section
    is then not read and parsed again.

    The fast check streams the message; only when a signature does not pass
    there is the message read into memory for dkimpy (which verifies a
    message held in memory): this runs in the thread pool, and the bytes are
    dropped when it returns."""
    start = f.tell()
    records = {name: r for name, r in keys.items() if r is not None and _usable(name, r)}
    if scan is None:
        fields = plain_fields(_header_block(f))
    else:
        f.seek(start + len(scan.block))
        fields = scan.fields
    passed = passes_fields(fields, f, records, count, time.time())
    if all(passed):
        return [(PASS, "")] * count
    f.seek(start)
    message = f.read()
    return [(PASS, "") if ok else _verify_one(message, idx, keys) for idx, ok in enumerate(passed)]


def _usable(name: str, record: bytes) -> bool:
    """dkimpy can parse the key ``record`` published at ``name``."""
    check = _cached_key_problem if len(record) <= CACHED_RECORD else _key_problem
    return check(name.encode("ascii"), record) is None


def _verify_one(message: bytes, idx: int, keys: dict[str, bytes | None]) -> tuple[str, str]:
    verifier = dkim.DKIM(message, minkey=MIN_RSA_BITS)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        # dkimpy turns its own key errors into a plain False; these exceptions
        # are ours, so they pass through it and keep their meaning.
        key = name.decode("ascii", "replace").lower()
        if key not in keys:
            raise _KeyProblem(TEMPERROR, f"key lookup failed for {key}")
        record = keys[key]
        if record is None:
            raise _KeyProblem(PERMERROR, f"no key record at {key}")
        problem = (_cached_key_problem if len(record) <= CACHED_RECORD else _key_problem)(name, record)
        if problem is not None:
            raise _KeyProblem(PERMERROR, f"unusable key at {key}: {problem}")
        return record

    try:
        ok = verifier.verify(idx, dnsfunc=dnsfunc)
    except _KeyProblem as e:
        return e.result, e.reason
    except dkim.KeyFormatError as e:
        return PERMERROR, f"unusable key: {e}"
    except dkim.MessageFormatError as e:
        return NEUTRAL, f"signature not processable: {e}"
    except dkim.ValidationError as e:
        text = str(e)
        if "body hash mismatch" in text:
            return FAIL, "body hash mismatch"
        return NEUTRAL, f"signature not processable: {text}"
    except dkim.DKIMException as e:
        return NEUTRAL, f"signature not processable: {e}"
    return (PASS, "") if ok else (FAIL, "signature does not verify")


def _key_problem(name: bytes, record: bytes) -> str | None:
    """Why dkimpy cannot use the key ``record`` published at ``name``, or None.

    dkimpy parses the key again while verifying; this first parse only tells
    an unusable key (permerror) from a bad signature, and its outcome depends
    on the record alone, so it is remembered (``_cached_key_problem``, for
    records of a usual size): mail from one sender repeats the same few
    records, and parsing an RSA key is a good part of the verification's cost."""
    try:
        dkim.evaluate_pk(name, record)
    except Exception as e:  # noqa: BLE001  (dkimpy raises several types for a bad key)
        return str(e)
    return None


_cached_key_problem = functools.lru_cache(maxsize=KEY_CACHE)(_key_problem)


def _with_file(path: str, reader: Callable[[IO[bytes]], Any]) -> Any:
    """Blocking: ``reader`` of the file at ``path``."""
    with open(path, "rb") as f:
        return reader(f)


class _KeyProblem(Exception):
    """The key could not be had (temperror) or used (permerror)."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@implementer(IDKIMVerifier)
class DKIMVerifier:
    """``verify(path)`` on a twisted.names resolver and a ``run_blocking`` pool."""

    def __init__(
        self,
        resolver: IResolver,
        run_blocking: Callable[..., Deferred],
        timeout: tuple[int, ...] = DNS_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.run_blocking = run_blocking
        self.timeout = timeout

    def verify(self, path: str) -> Deferred[list[DKIMResult]]:
        """Deferred list of one DKIMResult per DKIM-Signature ([] when unsigned)."""
        return self.verify_message(lambda reader: self.run_blocking(_with_file, path, reader))

    def verify_message(self, read: Callable[[Callable[[IO[bytes]], Any]], Deferred]) -> Deferred[list[DKIMResult]]:
        """As ``verify``, for a message given by its reader: ``read(reader)``
        runs ``reader(f)`` in the thread pool on a binary file at the start of
        the message (``IMessage.run_blocking``)."""
        return Deferred.fromCoroutine(self._verify(read))

    async def _verify(self, read: Callable[[Callable[[IO[bytes]], Any]], Deferred]) -> list[DKIMResult]:
        scan: _Scan = await read(read_signatures)
        signatures = scan.signatures
        if not signatures:
            return []
        checked = signatures[:MAX_SIGNATURES]
        names = sorted({f"{s.selector}._domainkey.{s.domain}".lower() for s in checked if not s.error})
        keys: dict[str, bytes | None] = {}
        results = await DeferredList([Deferred.fromCoroutine(self._key(n)) for n in names], consumeErrors=True)
        for name, (ok, value) in zip(names, results, strict=False):
            if ok:  # a failed (temporary) lookup stays out of ``keys``
                keys[name + "."] = value
        count = len(checked)
        outcomes: list[tuple[str, str]] = await read(lambda f: verify_file(f, keys, count, scan))
        out: list[DKIMResult] = []
        for sig, (result, reason) in zip(checked, outcomes, strict=False):
            if sig.error:
                result, reason = NEUTRAL, sig.error
            out.append(DKIMResult(result, sig.domain, sig.selector, sig.b, reason))
        for sig in signatures[MAX_SIGNATURES:]:
            out.append(DKIMResult(NEUTRAL, sig.domain, sig.selector, sig.b, "not checked: too many signatures"))
        return out

    async def _key(self, name: str) -> bytes | None:
        """The key record's text; None: none exists; raises TempDNSError."""
        try:
            records = txt_strings(await lookup(self.resolver, name, dns.TXT, self.timeout))
        except DNSNameError:
            return None
        # RFC 6376 section 3.6.2.2: several records give undefined results; use the first.
        return records[0] if records else None
