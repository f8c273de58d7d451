"""The fast DKIM check (mailstack.inbound.dkimfast): its pass agrees with dkimpy.

Known answers: messages signed by dkimpy and by our signer pass.  Signatures
with tags out of the ordinary are left to dkimpy.  A differential property
test mutates signed messages at random and checks that the fast check never
passes what dkimpy does not, and that verify_file (fast, then dkimpy) gives
dkimpy's result for every signature.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.dkim import canon, sign
from mailstack.inbound import dkimfast, dkimverify
from tests.inbound.test_dkimverify import ED_SEED, ED_TXT, MESSAGE, RSA_PEM, RSA_TXT

RSA_PRIV = serialization.load_pem_private_key(RSA_PEM, None)
ED_PRIV = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(ED_SEED))
KEYS = {"rsa._domainkey.example.org.": RSA_TXT.encode(), "ed._domainkey.example.org.": ED_TXT.encode()}
NOW = 1796378400


def fast(message: bytes, records: dict[str, bytes] = KEYS, count: int = 1, now: float | None = None) -> list[bool]:
    """The fast check's verdict on each signature of ``message``."""
    f = io.BytesIO(message)
    block = dkimverify._header_block(f)
    return dkimfast.passes(block, f, records, count, time.time() if now is None else now)


def dkimpy(message: bytes, records: dict[str, bytes | None], count: int) -> list[tuple[str, str]]:
    """dkimpy's verdict alone, as the verifier gave it before the fast check."""
    return [dkimverify._verify_one(message, idx, records) for idx in range(count)]


def dkimpy_sign(message: bytes, selector: bytes, key: bytes, algorithm: bytes, c: tuple[bytes, bytes]) -> bytes:
    """``message`` signed by dkimpy for example.org."""
    return dkim.sign(message, selector, b"example.org", key, signature_algorithm=algorithm, canonicalize=c) + message


class _Collect:
    """A hasher for dkimpy's hash_headers that keeps the bytes it is given."""

    def __init__(self) -> None:
        self.data = b""

    def update(self, data: bytes) -> None:
        self.data += data


def tag_sign(message: bytes, tags: list[bytes], selector: bytes = b"rsa", algorithm: str = "rsa") -> bytes:
    """``message`` with a DKIM-Signature of any ``tags`` (besides s=, bh= and b=),
    hashed the way dkimpy verifies (its own canonicalization and header
    selection), so the fast check is compared with dkimpy, not with itself."""
    parsed = dict(t.split(b"=", 1) for t in tags)
    try:
        policy = CanonicalizationPolicy.from_c_value(parsed.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:  # hashed as relaxed: still valid but for c=
        policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    headers, body = dkim.rfc822_parse(message)
    body = policy.canonicalize_body(body)
    if b"l" in parsed:
        body = body[: int(parsed[b"l"])]
    bh = base64.b64encode(hashlib.sha256(body).digest())
    value = b" " + b"; ".join([*tags, b"s=" + selector, b"bh=" + bh]) + b"; b="
    names = [n.strip().lower() for n in parsed[b"h"].split(b":")]
    names += [b"from"] if b"from" in names else []
    hasher = _Collect()
    dkim.hash_headers(hasher, policy, policy.canonicalize_headers(headers), names, (b"DKIM-Signature", value), None)
    if algorithm == "rsa":
        sig = RSA_PRIV.sign(hasher.data, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = ED_PRIV.sign(hashlib.sha256(hasher.data).digest())
    return b"DKIM-Signature:" + value + base64.b64encode(sig) + b"\r\n" + message


ORDINARY = [b"v=1", b"a=rsa-sha256", b"c=relaxed/relaxed", b"d=example.org", b"h=from:to:subject"]


def with_tag(tag: bytes, tags: list[bytes] = ORDINARY) -> list[bytes]:
    """``tags`` with ``tag`` replacing the one of its name, or added."""
    name = tag.split(b"=", 1)[0] + b"="
    return [t for t in tags if not t.startswith(name)] + [tag]


class KnownAnswerTests(SynchronousTestCase):
    def test_dkimpy_signatures_pass(self) -> None:
        """dkimpy's RSA and Ed25519 signatures, in all four c= combinations, pass the fast check."""
        for selector, key, algorithm in ((b"rsa", RSA_PEM, b"rsa-sha256"), (b"ed", ED_SEED, b"ed25519-sha256")):
            for c in itertools.product((b"relaxed", b"simple"), repeat=2):
                message = dkimpy_sign(MESSAGE, selector, key, algorithm, c)
                self.assertEqual(fast(message), [True], (algorithm, c))

    def test_our_signatures_pass(self) -> None:
        """Signatures of mailstack.dkim.sign (relaxed/relaxed, oversigned From) pass, RSA and Ed25519."""
        head, _, body = MESSAGE.partition(b"\r\n\r\n")
        h = canon.BodyHash()
        h.feed(body)
        for selector, algorithm, priv in ((b"rsa", "rsa", RSA_PRIV), (b"ed", "ed25519", ED_PRIV)):
            key = sign.SigningKey("example.org", selector.decode(), algorithm, priv)
            field = sign.sign_one(canon.header_fields(head + b"\r\n"), h.digest(), key, NOW)
            self.assertEqual(fast(field + MESSAGE, now=NOW), [True], algorithm)

    def test_dkimpy_agrees(self) -> None:
        """The test's own signer (dkimpy's hashing) makes signatures dkimpy passes, and so does the fast check."""
        for c in (b"c=relaxed/relaxed", b"c=simple/simple", b"c=relaxed", b"c=simple/relaxed"):
            message = tag_sign(MESSAGE, with_tag(c))
            self.assertEqual(dkimpy(message, KEYS, 1), [("pass", "")], c)
            self.assertEqual(fast(message), [True], c)

    def test_default_canonicalization(self) -> None:
        """Without c= (simple/simple, RFC 6376 section 3.5) the signature is still taken."""
        message = tag_sign(MESSAGE, [t for t in ORDINARY if not t.startswith(b"c=")])
        self.assertEqual(fast(message), [True])

    def test_large_message_streamed(self) -> None:
        """A body of many chunks, with a CRLF split across chunk boundaries, passes; the
        body is read in CHUNK pieces only."""
        body = b"".join(b"line %d of a long body  \t with  spaces\r\n" % i for i in range(40000))
        message = tag_sign(MESSAGE + body, ORDINARY)
        self.assertEqual(fast(message), [True])
        reads: list[int] = []

        class Reader(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                reads.append(-1 if size is None else size)
                return super().read(size)

        f = Reader(message)
        block = dkimverify._header_block(f)
        self.assertEqual(dkimfast.passes(block, f, KEYS, 1, time.time()), [True])
        self.assertTrue(reads and all(0 < r <= dkimfast.CHUNK for r in reads))

    def test_several_signatures(self) -> None:
        """Each signature is judged on its own; a broken one does not spoil the other."""
        good = tag_sign(MESSAGE, ORDINARY)
        bad = good.replace(b"bh=", b"bh=AAAA", 1)
        both = tag_sign(bad, with_tag(b"a=ed25519-sha256"), selector=b"ed", algorithm="ed25519")
        self.assertEqual(fast(both, count=2), [True, False])


class LeftToDkimpyTests(SynchronousTestCase):
    """Signatures, keys and messages out of the ordinary are never passed here."""

    def assertLeft(self, message: bytes, records: dict[str, bytes] = KEYS) -> None:
        self.assertEqual(fast(message, records), [False])

    def test_unusual_tags(self) -> None:
        """l=, rsa-sha1, an unknown c=, h= without From, an expired x=, a future t=."""
        now = int(time.time())
        for tag in (b"l=5", b"a=rsa-sha1", b"c=nowsp/simple", b"h=to:subject", b"x=%d" % (now - 5),
                    b"t=%d" % (now + 3600)):
            self.assertLeft(tag_sign(MESSAGE, with_tag(tag)))

    def test_identity(self) -> None:
        """An i= in d= is fine; one outside d= is not, nor a subdomain one under a t=s key."""
        self.assertEqual(fast(tag_sign(MESSAGE, with_tag(b"i=@mail.example.org"))), [True])
        self.assertLeft(tag_sign(MESSAGE, with_tag(b"i=@example.com")))
        strict = {name: record + b"; t=s" for name, record in KEYS.items()}
        self.assertLeft(tag_sign(MESSAGE, with_tag(b"i=@mail.example.org")), strict)
        self.assertEqual(fast(tag_sign(MESSAGE, with_tag(b"i=alice@example.org")), strict), [True])

    def test_key_records(self) -> None:
        """Key records with another v=, k= not matching a=, h= without sha256, another
        service, no p=, a short RSA key, or none at all."""
        short = rsa.RSAPublicNumbers(65537, (1 << 767) + 1).public_key()  # RFC 8301: too short
        der = short.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        message = tag_sign(MESSAGE, ORDINARY)
        name = "rsa._domainkey.example.org."
        p = RSA_TXT.split("p=", 1)[1].encode()
        for record in (b"v=DKIM2; p=" + p, b"k=ed25519; p=" + p, b"h=sha1; p=" + p, b"s=tlsrpt; p=" + p, b"p=",
                       b"v=DKIM1", b"p=" + base64.b64encode(der)):
            self.assertLeft(message, {name: record})
        self.assertLeft(message, {})
        self.assertEqual(fast(message, {name: b"h=sha1:sha256; s=email; p=" + p}), [True])

    def test_odd_messages(self) -> None:
        """Bare LF or CR, no CRLF at the end of the body, an mbox From line, a vertical tab
        in the header, a header without its empty line."""
        base = tag_sign(MESSAGE, ORDINARY)
        for message in (base.replace(b"Bob.\r\n", b"Bob.\n"), base.replace(b"Hello", b"Hel\rlo"),
                        base[:-2], b"From alice Fri Dec  4 10:00:00 2026\r\n" + base,
                        base.replace(b"Subject: hello", b"Subject: hello\x0b"), base.split(b"\r\n\r\n")[0]):
            self.assertLeft(message)


def _mutations() -> st.SearchStrategy:
    """Edits of a signed message: (kind, position, text)."""
    kinds = st.sampled_from(
        ["space", "tab", "trailing", "case", "swap", "duplicate", "remove-line", "add-line", "blank-lines",
         "fold", "b", "bh", "bare-lf", "bare-cr", "vt", "no-final-crlf", "header-space-name"]
    )
    return st.lists(st.tuples(kinds, st.integers(min_value=0, max_value=10**6), st.sampled_from([b"x", b"X", b" "])),
                    max_size=3)


def mutate(message: bytes, kind: str, pos: int, text: bytes) -> bytes:
    head, _, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    blines = body.split(b"\r\n")
    i, j = pos % len(lines), pos % max(len(blines), 1)
    if kind == "space":
        at = pos % (len(message) + 1)
        return message[:at] + b" " + message[at:]
    if kind == "tab":
        lines[i] = lines[i].replace(b" ", b" \t", 1)
    elif kind == "trailing":
        if pos % 2:
            lines[i] += b" "
        else:
            blines[j] += b"\t "
    elif kind == "case":
        lines[i] = lines[i].swapcase() if pos % 3 else lines[i][:1].swapcase() + lines[i][1:]
    elif kind == "swap":
        k = (pos // 7) % len(lines)
        lines[i], lines[k] = lines[k], lines[i]
    elif kind == "duplicate":
        lines.insert(pos % (len(lines) + 1), lines[i])
    elif kind == "remove-line":
        del blines[j]
    elif kind == "add-line":
        blines.insert(j, text)
    elif kind == "blank-lines":
        body += b"\r\n" * (1 + pos % 3)
        return head + b"\r\n\r\n" + body
    elif kind == "fold":
        lines[i] = lines[i].replace(b" ", b"\r\n ", 1)
    elif kind in ("b", "bh"):
        tag = b" " + kind.encode() + b"="
        at = message.find(tag)
        if at >= 0:
            at += len(tag) + pos % 20
            return message[:at] + (b"A" if message[at : at + 1] != b"A" else b"B") + message[at + 1 :]
    elif kind == "bare-lf":
        blines[j] += b"\n"
    elif kind == "bare-cr":
        lines[i] += b"\r"
    elif kind == "vt":
        lines[i] += b"\x0b"
    elif kind == "no-final-crlf":
        return message.rstrip(b"\r\n") + text
    elif kind == "header-space-name":
        lines[i] = lines[i].replace(b":", b" :", 1)
    return b"\r\n".join(lines) + b"\r\n\r\n" + b"\r\n".join(blines)


SIGNED_BODIES = st.lists(st.sampled_from([b"Hello Bob.", b"", b"  two  spaces\t", b"a\tb ", b"--", b"."]),
                         max_size=6).map(lambda ls: b"".join(line + b"\r\n" for line in ls))


class DifferentialTests(SynchronousTestCase):
    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        body=SIGNED_BODIES,
        extra=st.lists(st.sampled_from([b"Cc: carol@example.net", b"From: Mallory <m@example.com>",
                                        b"X-Tag:  spaced \t value", b"Subject: second"]), max_size=2),
        how=st.sampled_from(["ordinary", "ed25519", "simple", "relaxed/simple", "l=", "dkimpy", "ours"]),
        mutations=_mutations(),
    )
    def test_fast_pass_implies_dkimpy_pass(self, body, extra, how, mutations) -> None:
        """Whatever the message and its edits: a fast pass is a dkimpy pass, and
        verify_file's result per signature is exactly dkimpy's, with the header
        section read anew or taken from read_signatures' scan."""
        head = MESSAGE.split(b"\r\n\r\n")[0] + b"".join(b"\r\n" + e for e in extra)
        message = head + b"\r\n\r\n" + body
        if how == "ordinary":
            signed = tag_sign(message, ORDINARY)
        elif how == "ed25519":
            signed = tag_sign(message, with_tag(b"a=ed25519-sha256"), b"ed", "ed25519")
        elif how in ("simple", "relaxed/simple"):
            signed = tag_sign(message, with_tag(b"c=" + how.encode()))
        elif how == "l=":
            signed = tag_sign(message, with_tag(b"l=%d" % (len(body) // 2)))
        elif how == "dkimpy":
            signed = dkimpy_sign(message, b"rsa", RSA_PEM, b"rsa-sha256", (b"simple", b"relaxed"))
        else:
            fields = canon.header_fields(head + b"\r\n")
            h = canon.BodyHash()
            h.feed(body)
            key = sign.SigningKey("example.org", "ed", "ed25519", ED_PRIV)
            signed = sign.sign_one(fields, h.digest(), key, int(time.time())) + message
        for kind, pos, text in mutations:
            signed = mutate(signed, kind, pos, text)
        count = max(1, signed.count(b"DKIM-Signature:"))
        expected = outcome(lambda: dkimpy(signed, KEYS, count))
        verdicts = fast(signed, count=count)
        for idx, ok in enumerate(verdicts):
            if ok:
                self.assertIsInstance(expected, list)
                self.assertEqual(expected[idx][0], "pass")
        self.assertEqual(outcome(lambda: dkimverify.verify_file(io.BytesIO(signed), KEYS, count)), expected)
        try:
            scan = dkimverify.read_signatures(io.BytesIO(signed))
        except Exception:  # noqa: BLE001  (dkimpy's parse of a garbled header raises; so does the verifier)
            scan = None
        if scan is not None:
            rescanned = outcome(lambda: dkimverify.verify_file(io.BytesIO(signed), KEYS, count, scan))
            self.assertEqual(rescanned, expected)
        if not mutations and how != "l=":
            self.assertEqual(verdicts, [True] * count)


def outcome(call: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]] | type[BaseException]:
    """The results, or the type of the exception raised (dkimpy raises for some
    headers it cannot parse; the verifier's caller sees that as before)."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001
        return type(e)


class WithoutBTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from([b"b=", b" b =", b";b=", b"bh=", b"AbC+/=", b" ", b"\t", b"\r\n", b"\r\n\t",
                                     b"\n", b";", b"x", b"-", b"\x0b", b"h=from"]), max_size=12).map(b"".join))
    def test_as_dkimpy(self, value: bytes) -> None:
        """without_b empties b= exactly as dkimpy's RE_BTAG does, for any value."""
        self.assertEqual(dkimfast.without_b(value), dkim.RE_BTAG.sub(rb"\1", value))

    def test_signature_value(self) -> None:
        """A folded b= at the end of the field loses its value and the final CRLF."""
        value = b" v=1; a=rsa-sha256; bh=AB+/;\r\n\tb=AbCd\r\n\tEfGh==\r\n"
        self.assertEqual(dkimfast.without_b(value), b" v=1; a=rsa-sha256; bh=AB+/;\r\n\tb=")
        self.assertEqual(dkimfast.without_b(value), dkim.RE_BTAG.sub(rb"\1", value))
