"""Tests for mailstack.dkim.signer: key choice by the From domain."""

import os

import dkim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.dkim import canon, keys, signer

NOW = 1796378400


def parts(message):
    block, _, body = message.partition(b"\r\n\r\n")
    h = canon.BodyHash()
    h.feed(body)
    return canon.header_fields(block + b"\r\n"), h.digest()


class SignerTests(SynchronousTestCase):
    def setUp(self):
        self.store = keys.KeyStore(os.path.abspath(self.mktemp()))
        self.store.ensure_keys(["example.org", "other.example"], now=NOW)
        self.signer = signer.DKIMSigner(self.store, lambda d: d == "example.org")
        verifyObject(signer.IDKIMSigner, self.signer)

    def test_localFromSigned(self):
        """Mail from a local domain gets one verifying signature per active key."""
        message = b"From: A <a@Example.org>\r\nSubject: x\r\n\r\nhi\r\n"
        fields = self.signer.fields(*parts(message), NOW)
        self.assertEqual(len(fields), 1)
        txt = {f"{i.name}.".encode(): i.record.encode() for i in self.store.list()}
        self.assertTrue(dkim.verify(fields[0] + message, dnsfunc=lambda n, timeout=5: txt.get(n)))

    def test_foreignOrAmbiguousFromNotSigned(self):
        """A non-local From domain (even one with keys), or no single From address, gets nothing."""
        for message in [
            b"From: a@other.example\r\n\r\nhi\r\n",
            b"From: a@example.org, b@example.org\r\n\r\nhi\r\n",
            b"Subject: no from\r\n\r\nhi\r\n",
        ]:
            self.assertEqual(self.signer.fields(*parts(message), NOW), [], message)
