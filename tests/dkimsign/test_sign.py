"""Tests for mailstack.dkim.sign, checked with dkimpy's verifier (an independent implementation)."""

import dkim
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial.unittest import SynchronousTestCase

from mailstack.dkim import canon, keys, sign

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject:  Quarterly \r\n\treport\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"List-Unsubscribe: <https://example.org/u/1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Other: not signed\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n\r\nthe figures.\r\n\r\n\r\n"
)

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def split(message):
    block, _, body = message.partition(b"\r\n\r\n")
    h = canon.BodyHash()
    h.feed(body)
    return canon.header_fields(block + b"\r\n"), h.digest()


class SignTests(SynchronousTestCase):
    def setUp(self):
        self.keys = [
            sign.SigningKey("example.org", "r2026", "rsa", RSA_KEY),
            sign.SigningKey("example.org", "e2026", "ed25519", ED_KEY),
        ]
        self.txt = {
            b"r2026._domainkey.example.org.": b"v=DKIM1; k=rsa; p=" + keys.public_value(RSA_KEY).encode(),
            b"e2026._domainkey.example.org.": b"v=DKIM1; k=ed25519; p=" + keys.public_value(ED_KEY).encode(),
        }

    def dnsfunc(self, name, timeout=5):
        return self.txt.get(name)

    def signed(self, message=MESSAGE):
        fields, body_hash = split(message)
        return b"".join(sign.sign(fields, body_hash, self.keys, 1796378400)) + message

    def verify_all(self, message):
        d = dkim.DKIM(message)
        results = []
        for i in range(len(self.keys)):
            try:
                results.append(d.verify(i, dnsfunc=self.dnsfunc))
            except dkim.ValidationError:  # dkimpy raises on a body hash mismatch
                results.append(False)
        return results

    def test_verifiesWithDkimpy(self):
        """Both the rsa-sha256 and the ed25519-sha256 signature verify with dkimpy."""
        self.assertEqual(self.verify_all(self.signed()), [True, True])

    def test_tags(self):
        """relaxed/relaxed, t=, no l=, the listed fields, From oversigned."""
        fields = sign.sign(*split(MESSAGE), self.keys[:1], 1796378400)
        tags = dict(
            t.strip().split("=", 1)
            for t in fields[0].decode().split(":", 1)[1].replace("\r\n\t", " ").split(";")
            if t.strip()
        )
        self.assertEqual(tags["c"], "relaxed/relaxed")
        self.assertEqual(tags["a"], "rsa-sha256")
        self.assertEqual(tags["t"], "1796378400")
        self.assertNotIn("l", tags)
        self.assertEqual(
            tags["h"],
            "from:from:to:subject:date:message-id:list-unsubscribe:list-unsubscribe-post",
        )

    def test_changedSubjectFails(self):
        """A Subject changed after signing fails verification for both keys."""
        tampered = self.signed().replace(b"Quarterly", b"Monthly")
        self.assertEqual(self.verify_all(tampered), [False, False])

    def test_changedBodyFails(self):
        """A body changed after signing fails verification."""
        tampered = self.signed().replace(b"figures", b"numbers")
        self.assertEqual(self.verify_all(tampered), [False, False])

    def test_whitespaceChangesStillVerify(self):
        """Relaxed canonicalization: refolding and trailing spaces in transit are harmless."""
        changed = self.signed().replace(b"Subject:  Quarterly \r\n\treport", b"Subject: Quarterly report")
        changed = changed.replace(b"the figures.\r\n", b"the figures.   \r\n")
        self.assertEqual(self.verify_all(changed), [True, True])

    def test_oversignedFrom(self):
        """A second From added on top after signing breaks the signatures."""
        added = b"From: Mallory <ceo@example.org>\r\n"
        signed = self.signed()
        end = signed.index(b"From: Alice")
        self.assertEqual(self.verify_all(signed[:end] + added + signed[end:]), [False, False])

    def test_authorDomain(self):
        """The From domain picks the keys; several From fields or addresses give none."""
        self.assertEqual(sign.author_domain(split(MESSAGE)[0]), "example.org")
        self.assertEqual(
            sign.author_domain([("From", b"From: =?utf-8?q?x?= <a@B\xc3\xbccher.example>\r\n")]),
            "xn--bcher-kva.example",
        )
        self.assertIsNone(sign.author_domain([("From", b"From: a@x.example, b@y.example\r\n")]))
        self.assertIsNone(sign.author_domain([("From", b"From: a@x.example\r\n"), ("from", b"from: b@x.example\r\n")]))
        self.assertIsNone(sign.author_domain([("To", b"To: a@x.example\r\n")]))

    def test_authorDomainRemembered(self):
        """A From field seen before gives the same domain again; one longer than
        CACHED_FROM gives its domain too (parsed, not remembered)."""
        field = [("From", b"From: Alice <alice@Example.ORG>\r\n")]
        self.assertEqual([sign.author_domain(field) for _ in range(2)], ["example.org", "example.org"])
        long_name = b"A" * sign.CACHED_FROM
        self.assertEqual(sign.author_domain([("From", b"From: " + long_name + b" <a@example.net>\r\n")]), "example.net")
