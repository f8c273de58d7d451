"""DMARC: author domain extraction, record parsing, discovery, alignment and pct."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.inbound.dkimverify import DKIMResult
from mailstack.inbound.dmarc import (
    DMARCEvaluator,
    DMARCResult,
    FromError,
    from_domains,
    parse_record,
    strictest,
)
from mailstack.inbound.interfaces import IDMARCEvaluator
from mailstack.inbound.spf import SPFResult
from tests.support.dnsserver import ZoneResolver


def spf(result, domain):
    return SPFResult(result, "mailfrom", domain, f"x@{domain}")


def dkim(result, domain):
    return DKIMResult(result, domain, "sel")


class FixedRandom(random.Random):
    """An rng whose random() is always ``value``."""

    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def random(self):
        return self.value


class FromDomainTests(SynchronousTestCase):
    def test_single_address(self) -> None:
        """The domain of the one From address, lower-cased."""
        self.assertEqual(from_domains(["Alice <alice@Example.ORG>"]), ("example.org",))

    def test_several_addresses_give_each_domain_once(self) -> None:
        """A From field with several addresses yields each distinct domain (RFC 7489 6.6.1)."""
        self.assertEqual(from_domains(["a@b.example, c@D.example, e@b.example"]), ("b.example", "d.example"))

    def test_missing_multiple_or_garbage_raise(self) -> None:
        """No From, two From fields, or an unparsable one raise FromError (RFC 7489 6.6.1)."""
        for values in (
            [],
            ["a@b.example", "c@d.example"],
            ["garbage"],
            ["undisclosed-recipients:;"],
            ["a@[192.0.2.1]"],
        ):
            with self.assertRaises(FromError, msg=values):
                from_domains(values)


class RecordTests(SynchronousTestCase):
    def test_parse_all_tags(self) -> None:
        """p, sp, pct, adkim and aspf are read; unknown tags are ignored."""
        policy = parse_record(
            "v=DMARC1; p=reject; sp=quarantine; pct=20; adkim=s; aspf=s; fo=1; rua=mailto:a@b.example"
        )
        self.assertEqual(
            (policy.p, policy.sp, policy.pct, policy.adkim, policy.aspf), ("reject", "quarantine", 20, "s", "s")
        )

    def test_defaults_and_bad_optional_values(self) -> None:
        """Missing or invalid optional tags take their defaults (pct 100, relaxed alignment)."""
        policy = parse_record("v=DMARC1; p=none; pct=250; adkim=x; sp=bogus")
        self.assertEqual((policy.p, policy.sp, policy.pct, policy.adkim, policy.aspf), ("none", None, 100, "r", "r"))

    def test_invalid_p(self) -> None:
        """A record without a valid p= is unusable, unless a valid rua= makes it p=none (RFC 7489 6.6.3)."""
        self.assertIsNone(parse_record("v=DMARC1; p=bogus"))
        self.assertEqual(parse_record("v=DMARC1; rua=mailto:agg@example.org").p, "none")


ZONE = {
    "_dmarc.example.org": [("TXT", "v=DMARC1; p=reject; sp=quarantine")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
    "_dmarc.half.example": [("TXT", "v=DMARC1; p=reject; pct=50")],
    "_dmarc.broken.example": [("TXT", "v=DMARC1; p=maybe")],
    "_dmarc.two.example": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
    "_dmarc.flaky.example": ["TIMEOUT"],
    "_dmarc.co.uk": [("TXT", "v=DMARC1; p=reject")],
}


class EvaluatorTests(SynchronousTestCase):
    def evaluate(self, domain, spf_result, dkim_results, rng_value=0.0):
        evaluator = DMARCEvaluator(ZoneResolver(ZONE), FixedRandom(rng_value))
        return self.successResultOf(evaluator.evaluate(domain, spf_result, dkim_results))

    def test_provides_interface(self) -> None:
        """DMARCEvaluator provides IDMARCEvaluator."""
        self.assertTrue(verifyObject(IDMARCEvaluator, DMARCEvaluator(ZoneResolver({}), random.Random(0))))

    def test_aligned_dkim_passes(self) -> None:
        """A passing DKIM signature of a subdomain aligns in relaxed mode: pass, nothing to apply."""
        r = self.evaluate("example.org", spf("fail", "bounce.other.example"), [dkim("pass", "mail.example.org")])
        self.assertEqual((r.result, r.dkim_aligned, r.spf_aligned, r.disposition), ("pass", True, False, "none"))

    def test_aligned_spf_passes(self) -> None:
        """An SPF pass for a MAIL FROM domain under the same organizational domain aligns."""
        r = self.evaluate("example.org", spf("pass", "bounces.example.org"), [])
        self.assertEqual((r.result, r.spf_aligned), ("pass", True))

    def test_strict_alignment_needs_equal_domains(self) -> None:
        """adkim=s and aspf=s: a subdomain does not align; fail with p=reject."""
        r = self.evaluate("strict.example", spf("pass", "mail.strict.example"), [dkim("pass", "mail.strict.example")])
        self.assertEqual((r.result, r.policy, r.disposition), ("fail", "reject", "reject"))

    def test_unaligned_pass_fails(self) -> None:
        """Passing SPF and DKIM for other domains do not count: fail, p=reject applies."""
        r = self.evaluate(
            "example.org", spf("pass", "other.example"), [dkim("pass", "other.example"), dkim("fail", "example.org")]
        )
        self.assertEqual((r.result, r.disposition, r.record_domain), ("fail", "reject", "example.org"))

    def test_subdomain_uses_organizational_record_and_sp(self) -> None:
        """No record at the subdomain: the organizational domain's record applies with its sp=."""
        r = self.evaluate("news.example.org", spf("none", ""), [])
        self.assertEqual((r.result, r.policy, r.record_domain), ("fail", "quarantine", "example.org"))

    def test_organizational_domain_uses_public_suffix_list(self) -> None:
        """For a.b.example.co.uk the organizational domain is example.co.uk, never co.uk."""
        evaluator = DMARCEvaluator(ZoneResolver({}), random.Random(0))
        self.assertEqual(evaluator.organizational_domain("a.b.example.co.uk"), "example.co.uk")
        r = self.evaluate("mail.example.co.uk", spf("none", ""), [])
        self.assertEqual(r.result, "none")

    def test_pct_selects_with_rng(self) -> None:
        """pct=50: a draw below 50 applies reject, a draw above applies the next weaker policy."""
        self.assertEqual(self.evaluate("half.example", spf("fail", "x.example"), [], 0.3).disposition, "reject")
        self.assertEqual(self.evaluate("half.example", spf("fail", "x.example"), [], 0.7).disposition, "quarantine")

    def test_no_record_is_none(self) -> None:
        """A domain without any DMARC record gives none."""
        self.assertEqual(self.evaluate("nodmarc.example", spf("fail", "x.example"), []).result, "none")

    def test_two_records_are_none(self) -> None:
        """Two DMARC records at one name end discovery: none (RFC 7489 6.6.3)."""
        self.assertEqual(self.evaluate("two.example", spf("fail", "x.example"), []).result, "none")

    def test_broken_record_is_permerror(self) -> None:
        """A record with an invalid p= and no rua= is permerror, with nothing to apply."""
        r = self.evaluate("broken.example", spf("fail", "x.example"), [])
        self.assertEqual((r.result, r.disposition), ("permerror", "none"))

    def test_dns_timeout_is_temperror(self) -> None:
        """A timeout looking up the record is temperror."""
        self.assertEqual(self.evaluate("flaky.example", spf("pass", "flaky.example"), []).result, "temperror")

    def test_strictest_of_several_domains(self) -> None:
        """For several author domains the failing result with the strictest disposition wins."""
        results = [
            DMARCResult("pass", "a.example"),
            DMARCResult("fail", "b.example", "quarantine", "quarantine"),
            DMARCResult("fail", "c.example", "reject", "reject"),
        ]
        self.assertEqual(strictest(results).from_domain, "c.example")
        self.assertEqual(strictest(results[:1]).from_domain, "a.example")
