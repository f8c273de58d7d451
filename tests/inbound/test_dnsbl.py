"""DNSBLChecker: query names, listing codes, error codes, timeouts, list order."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.names.common import ResolverBase
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.inbound.dnsbl import DNSBLChecker
from mailstack.inbound.interfaces import IDNSBLChecker
from tests.support.dnsserver import ZoneResolver


class DNSBLTests(SynchronousTestCase):
    def listed(self, zone, zones, ip):
        resolver = ZoneResolver(zone)
        return self.successResultOf(DNSBLChecker(resolver, zones).listed(ip)), resolver

    def test_provides_interface(self) -> None:
        """DNSBLChecker provides IDNSBLChecker."""
        self.assertTrue(verifyObject(IDNSBLChecker, DNSBLChecker(ZoneResolver({}), [])))

    def test_ipv4_reversed_octets_listed(self) -> None:
        """192.0.2.99 is asked as 99.2.0.192.<zone>; 127.0.0.2 means listed."""
        found, resolver = self.listed({"99.2.0.192.bl.example": [("A", "127.0.0.2")]}, ["bl.example"], "192.0.2.99")
        self.assertEqual(found, "bl.example")
        self.assertEqual(resolver.queries, [("99.2.0.192.bl.example", 1)])

    def test_ipv6_nibbles(self) -> None:
        """An IPv6 client is asked as 32 reversed nibbles."""
        name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example"
        found, _ = self.listed({name: [("A", "127.0.0.4")]}, ["bl.example"], "2001:db8::1")
        self.assertEqual(found, "bl.example")

    def test_nxdomain_not_listed(self) -> None:
        """NXDOMAIN means not listed."""
        self.assertIsNone(self.listed({}, ["bl.example"], "192.0.2.99")[0])

    def test_error_code_ignored_and_logged(self) -> None:
        """127.255.255.254 is the list's error answer: logged, never a listing."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        found, _ = self.listed({"99.2.0.192.bl.example": [("A", "127.255.255.254")]}, ["bl.example"], "192.0.2.99")
        self.assertIsNone(found)
        self.assertTrue(any("error code" in e["log_format"] for e in events))

    def test_not_a_listing_code(self) -> None:
        """127.0.0.1 and addresses outside 127.0.0.0/24 are not listings."""
        for code in ("127.0.0.1", "10.0.0.2", "127.0.1.2"):
            found, _ = self.listed({"99.2.0.192.bl.example": [("A", code)]}, ["bl.example"], "192.0.2.99")
            self.assertIsNone(found, code)

    def test_timeout_never_refuses(self) -> None:
        """A list that times out counts as not listed; another list still counts."""
        zone = {"99.2.0.192.slow.example": ["TIMEOUT"], "99.2.0.192.bl.example": [("A", "127.0.0.3")]}
        self.assertIsNone(self.listed(zone, ["slow.example"], "192.0.2.99")[0])
        self.assertEqual(self.listed(zone, ["slow.example", "bl.example"], "192.0.2.99")[0], "bl.example")

    def test_first_listing_in_configured_order(self) -> None:
        """Several lists listing: the first in configured order is reported."""
        zone = {"99.2.0.192.a.example": [("A", "127.0.0.2")], "99.2.0.192.b.example": [("A", "127.0.0.2")]}
        self.assertEqual(self.listed(zone, ["b.example", "a.example"], "192.0.2.99")[0], "b.example")

    def test_queries_in_parallel(self) -> None:
        """Every list is asked before any answer arrives."""

        class Pending(ResolverBase):
            def __init__(self):
                ResolverBase.__init__(self)
                self.pending = []

            def _lookup(self, name, cls, qtype, timeout):
                d = Deferred()
                self.pending.append(name)
                return d

        resolver = Pending()
        d = DNSBLChecker(resolver, ["a.example", "b.example"]).listed("192.0.2.99")
        self.assertNoResult(d)
        self.assertEqual(len(resolver.pending), 2)
        self.assertTrue(verifyObject(IResolver, resolver))
