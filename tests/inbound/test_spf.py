"""SPFVerifier behaviour outside the case table (spf_cases.py): identities, IPv6 macros, failures."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.inbound.interfaces import ISPFVerifier
from mailstack.inbound.spf import SPFVerifier
from tests.support.dnsserver import ZoneResolver


def verifier(zone):
    return SPFVerifier(ZoneResolver(zone), "mx.receiver.test", lambda: 1000.0)


class SPFVerifierTests(SynchronousTestCase):
    def test_provides_interface(self) -> None:
        """SPFVerifier provides ISPFVerifier."""
        self.assertTrue(verifyObject(ISPFVerifier, verifier({})))

    def test_helo_identity_for_null_sender(self) -> None:
        """MAIL FROM <> checks postmaster@<helo> against the HELO domain's record (RFC 7208 2.4)."""
        v = verifier({"helo.example": [("TXT", "v=spf1 ip4:192.0.2.1 -all")]})
        r = self.successResultOf(v.check("192.0.2.1", "", "helo.example"))
        self.assertEqual(
            (r.result, r.identity, r.domain, r.sender), ("pass", "helo", "helo.example", "postmaster@helo.example")
        )

    def test_mailfrom_identity(self) -> None:
        """A non-empty MAIL FROM is the identity checked; a non-matching address fails."""
        v = verifier({"sender.example": [("TXT", "v=spf1 ip4:192.0.2.1 -all")]})
        r = self.successResultOf(v.check("192.0.2.9", "a@sender.example", "whatever.example"))
        self.assertEqual((r.result, r.identity, r.domain), ("fail", "mailfrom", "sender.example"))

    def test_ipv6_i_macro_is_dotted_nibbles(self) -> None:
        """%{i} of an IPv6 client is 32 dot-separated nibbles (RFC 7208 7.3); %{ir} reverses them."""
        name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.lists.example"
        v = verifier(
            {
                "s.example": [("TXT", "v=spf1 exists:%{ir}.lists.example -all")],
                name: [("A", "127.0.0.2")],
            }
        )
        r = self.successResultOf(v.check("2001:db8::1", "x@s.example", "h.example"))
        self.assertEqual(r.result, "pass")

    def test_ipv4_mapped_client_checked_as_ipv4(self) -> None:
        """An IPv4-mapped IPv6 client address matches ip4 mechanisms."""
        v = verifier({"s.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")]})
        r = self.successResultOf(v.check("::ffff:192.0.2.7", "x@s.example", "h.example"))
        self.assertEqual(r.result, "pass")

    def test_servfail_is_temperror(self) -> None:
        """A DNS server failure on the record lookup is temperror, never none."""
        v = verifier({"s.example": ["SERVFAIL"]})
        r = self.successResultOf(v.check("192.0.2.1", "x@s.example", "h.example"))
        self.assertEqual(r.result, "temperror")

    def test_unparsable_client_address_is_permerror(self) -> None:
        """A client address that is not an IP address is permerror, not a crash."""
        r = self.successResultOf(verifier({}).check("not-an-ip", "x@s.example", "h.example"))
        self.assertEqual(r.result, "permerror")
