"""DKIMVerifier: prefetched keys over twisted.names, dkimpy in the (here synchronous) pool."""

from __future__ import annotations

import base64

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.defer import fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.inbound.dkimverify import MAX_SIGNATURES, DKIMVerifier
from mailstack.inbound.interfaces import IDKIMVerifier
from tests.support.dnsserver import ZoneResolver

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def run_now(f, *args, **kwargs):
    """A run_blocking that calls at once (the unit tests need no threads)."""
    try:
        return succeed(f(*args, **kwargs))
    except Exception as e:  # noqa: BLE001
        return fail(e)


def rsa_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(pub).decode()


def ed_key():
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed), "v=DKIM1; k=ed25519; p=" + base64.b64encode(pub).decode()


RSA_PEM, RSA_TXT = rsa_key()
ED_SEED, ED_TXT = ed_key()


def sign(message, selector, domain, key, algorithm=b"rsa-sha256"):
    return (
        dkim.sign(
            message, selector, domain, key, signature_algorithm=algorithm, include_headers=[b"from", b"to", b"subject"]
        )
        + message
    )


class DKIMVerifierTests(SynchronousTestCase):
    def verify(self, message, zone):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(message)
        resolver = ZoneResolver(zone)
        results = self.successResultOf(DKIMVerifier(resolver, run_now).verify(path))
        return results, resolver

    def test_provides_interface(self) -> None:
        """DKIMVerifier provides IDKIMVerifier."""
        self.assertTrue(verifyObject(IDKIMVerifier, DKIMVerifier(ZoneResolver({}), run_now)))

    def test_rsa_pass(self) -> None:
        """A good RSA-SHA256 signature passes and reports d= and s=."""
        results, resolver = self.verify(
            sign(MESSAGE, b"sel", b"example.org", RSA_PEM), {"sel._domainkey.example.org": [("TXT", RSA_TXT)]}
        )
        self.assertEqual([(r.result, r.domain, r.selector) for r in results], [("pass", "example.org", "sel")])
        self.assertIn(("sel._domainkey.example.org", 16), resolver.queries)

    def test_ed25519_pass(self) -> None:
        """An Ed25519-SHA256 signature (RFC 8463) passes."""
        results, _ = self.verify(
            sign(MESSAGE, b"ed", b"example.org", ED_SEED, b"ed25519-sha256"),
            {"ed._domainkey.example.org": [("TXT", ED_TXT)]},
        )
        self.assertEqual([r.result for r in results], ["pass"])

    def test_altered_body_fails(self) -> None:
        """A body changed after signing fails (body hash mismatch)."""
        signed = sign(MESSAGE, b"sel", b"example.org", RSA_PEM).replace(b"Hello Bob.", b"Hello Eve.")
        results, _ = self.verify(signed, {"sel._domainkey.example.org": [("TXT", RSA_TXT)]})
        self.assertEqual(results[0].result, "fail")

    def test_altered_header_fails(self) -> None:
        """A signed header changed after signing fails."""
        signed = sign(MESSAGE, b"sel", b"example.org", RSA_PEM).replace(b"Subject: hello", b"Subject: HELLO")
        results, _ = self.verify(signed, {"sel._domainkey.example.org": [("TXT", RSA_TXT)]})
        self.assertEqual(results[0].result, "fail")

    def test_missing_key_is_permerror(self) -> None:
        """No key record (NXDOMAIN) is permerror (RFC 6376 6.1.2)."""
        results, _ = self.verify(sign(MESSAGE, b"sel", b"example.org", RSA_PEM), {})
        self.assertEqual(results[0].result, "permerror")

    def test_bad_key_is_permerror(self) -> None:
        """A key record whose p= is not a key is permerror, not fail."""
        results, _ = self.verify(
            sign(MESSAGE, b"sel", b"example.org", RSA_PEM),
            {"sel._domainkey.example.org": [("TXT", "v=DKIM1; k=rsa; p=AAAA")]},
        )
        self.assertEqual(results[0].result, "permerror")

    def test_bad_key_stays_permerror(self) -> None:
        """A bad key record remembered from an earlier message is permerror again;
        a good one is remembered as good (the next message passes)."""
        signed = sign(MESSAGE, b"sel", b"example.org", RSA_PEM)
        bad = {"sel._domainkey.example.org": [("TXT", "v=DKIM1; k=rsa; p=AAAB")]}
        good = {"sel._domainkey.example.org": [("TXT", RSA_TXT)]}
        self.assertEqual([self.verify(signed, bad)[0][0].result for _ in range(2)], ["permerror", "permerror"])
        self.assertEqual([self.verify(signed, good)[0][0].result for _ in range(2)], ["pass", "pass"])

    def test_key_timeout_is_temperror(self) -> None:
        """A key lookup that times out is temperror."""
        results, _ = self.verify(
            sign(MESSAGE, b"sel", b"example.org", RSA_PEM), {"sel._domainkey.example.org": ["TIMEOUT"]}
        )
        self.assertEqual(results[0].result, "temperror")

    def test_unparsable_signature_is_neutral(self) -> None:
        """A DKIM-Signature without d= cannot be processed: neutral (RFC 8601 2.7.1)."""
        results, resolver = self.verify(b"DKIM-Signature: v=1; a=rsa-sha256; s=x; b=abc\r\n" + MESSAGE, {})
        self.assertEqual([r.result for r in results], ["neutral"])
        self.assertEqual(resolver.queries, [])

    def test_every_signature_reported(self) -> None:
        """Two signatures give two results in header order, each with its own d=."""
        once = sign(MESSAGE, b"sel", b"example.org", RSA_PEM)
        twice = sign(once, b"ed", b"other.example", ED_SEED, b"ed25519-sha256")
        results, _ = self.verify(twice, {"sel._domainkey.example.org": [("TXT", RSA_TXT)]})
        self.assertEqual(
            [(r.result, r.domain) for r in results], [("permerror", "other.example"), ("pass", "example.org")]
        )

    def test_unsigned_message(self) -> None:
        """A message without DKIM-Signature gives no results and no lookups."""
        results, resolver = self.verify(MESSAGE, {})
        self.assertEqual((results, resolver.queries), ([], []))

    def test_signature_count_bounded(self) -> None:
        """Signatures beyond MAX_SIGNATURES are reported neutral without lookups."""
        extra = b"".join(
            b"DKIM-Signature: v=1; a=rsa-sha256; d=d%d.example; s=s; h=from; bh=x; b=y\r\n" % i
            for i in range(MAX_SIGNATURES + 2)
        )
        results, resolver = self.verify(extra + MESSAGE, {})
        self.assertEqual(len(results), MAX_SIGNATURES + 2)
        self.assertEqual(results[-1].reason, "not checked: too many signatures")
        self.assertEqual(len(resolver.queries), MAX_SIGNATURES)
