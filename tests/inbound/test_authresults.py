"""Authentication-Results: the field we write and the forged ones we recognise."""

from __future__ import annotations

from email import message_from_string
from email.policy import default

from twisted.trial.unittest import SynchronousTestCase

from mailstack.inbound.authresults import (
    authserv_id,
    build,
    claims_authserv_id,
    is_forged,
    pvalue,
    quote,
)
from mailstack.inbound.dkimverify import DKIMResult
from mailstack.inbound.dmarc import DMARCResult
from mailstack.inbound.spf import SPFResult


class BuildTests(SynchronousTestCase):
    def test_all_methods(self) -> None:
        """spf, each dkim signature and dmarc appear with their properties, in that order."""
        field = build(
            "mx.example.net",
            spf=SPFResult("pass", "mailfrom", "example.org", "alice@example.org"),
            dkim=[
                DKIMResult("pass", "example.org", "sel", "abcdefgh"),
                DKIMResult("fail", "other.example", "s2", "", "body hash mismatch"),
            ],
            dmarc=DMARCResult("pass", "example.org"),
        )
        self.assertEqual(
            field,
            "Authentication-Results: mx.example.net;\r\n"
            "\tspf=pass smtp.mailfrom=alice@example.org;\r\n"
            "\tdkim=pass header.d=example.org header.s=sel header.b=abcdefgh;\r\n"
            '\tdkim=fail reason="body hash mismatch" header.d=other.example header.s=s2;\r\n'
            "\tdmarc=pass header.from=example.org\r\n",
        )

    def test_helo_identity_and_no_signature(self) -> None:
        """A null sender is reported as smtp.helo; no DKIM signature is dkim=none; a DMARC fail names the policy."""
        field = build(
            "mx.example.net",
            spf=SPFResult("none", "helo", "client.example", "postmaster@client.example"),
            dkim=[],
            dmarc=DMARCResult("fail", "example.org", "reject", "quarantine"),
        )
        self.assertIn("spf=none smtp.helo=client.example;", field)
        self.assertIn("dkim=none;", field)
        self.assertIn('dmarc=fail reason="p=reject dis=quarantine" header.from=example.org', field)

    def test_nothing_checked(self) -> None:
        """No method at all gives the no-result form."""
        self.assertEqual(build("mx.example.net"), "Authentication-Results: mx.example.net; none\r\n")

    def test_hostile_values_are_quoted(self) -> None:
        """Peer-supplied values with quotes, semicolons, CR/LF are quoted and escaped, never breaking the field."""
        sender = 'x";dmarc=pass\r\nX-Evil: 1"@example.org'
        field = build("mx.example.net", spf=SPFResult("fail", "mailfrom", "example.org", sender, reason="bad\r\nline"))
        self.assertNotIn("\r\nX-Evil", field)
        self.assertEqual(field.count("\r\n"), 2)  # two lines: the field name line, the spf line
        parsed = message_from_string(field + "\r\n", policy=default)
        self.assertEqual(len(parsed.get_all("Authentication-Results")), 1)
        self.assertIn('smtp.mailfrom="x\\";dmarc=pass  X-Evil: 1\\"@example.org"', field)

    def test_pvalue_forms(self) -> None:
        """Domains, addresses and tokens stay bare; anything else is quoted."""
        self.assertEqual(pvalue("example.org"), "example.org")
        self.assertEqual(pvalue("a.b+c@example.org"), "a.b+c@example.org")
        self.assertEqual(pvalue("has space"), '"has space"')
        self.assertEqual(quote('a\\b"c'), '"a\\\\b\\"c"')


class ForgedTests(SynchronousTestCase):
    def test_authserv_id_forms(self) -> None:
        """The authserv-id is read past comments and white space, bare or quoted."""
        self.assertEqual(authserv_id(" mx.example.net; spf=pass"), "mx.example.net")
        self.assertEqual(authserv_id(" (comment (nested)) MX.Example.NET 1; none"), "MX.Example.NET")
        self.assertEqual(authserv_id(b' "mx.example.net"; none'), "mx.example.net")
        self.assertIsNone(authserv_id("   "))

    def test_claims_our_hostname(self) -> None:
        """A field naming our hostname (any case, trailing dot) is ours; another host's is not."""
        self.assertTrue(claims_authserv_id(" MX.example.net.; dkim=pass", "mx.example.net"))
        self.assertFalse(claims_authserv_id(" mx.example.net.evil; dkim=pass", "mx.example.net"))
        self.assertFalse(claims_authserv_id(" other.example; dkim=pass", "mx.example.net"))

    def test_is_forged_checks_field_name(self) -> None:
        """Only Authentication-Results fields are candidates for removal."""
        self.assertTrue(is_forged(b"authentication-results", b" mx.example.net; spf=pass", "mx.example.net"))
        self.assertFalse(is_forged("X-Authentication-Results", " mx.example.net; spf=pass", "mx.example.net"))
