"""The fake DNS server of tests/support answers real twisted.names clients over UDP and TCP."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.interfaces import IResolver
from twisted.names import client, dns
from twisted.names.error import DNSNameError
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.support.dnsserver import DNSServer, ZoneResolver, listen

ZONE = {
    "example.org": [
        ("A", "192.0.2.1"),
        ("AAAA", "2001:db8::1"),
        ("MX", (10, "mx.example.org")),
        ("TXT", "v=spf1 -all"),
    ],
    "1.2.0.192.in-addr.arpa": [("PTR", "mx.example.org")],
    "big.example.org": [("TXT", ["x" * 200] * 5)],
}


class DNSServerTests(TestCase):
    def test_zone_resolver_is_iresolver(self) -> None:
        """ZoneResolver provides twisted's IResolver."""
        self.assertTrue(verifyObject(IResolver, ZoneResolver({})))

    async def test_in_process_udp_and_tcp(self) -> None:
        """Every record type is served over UDP; a large TXT (over 512 octets) comes over TCP; unknown names are
        NXDOMAIN."""
        port, ports = listen(reactor, ZONE)
        for p in ports:
            self.addCleanup(p.stopListening)
        r = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        answers, _, _ = await r.lookupAddress("example.org")
        self.assertEqual(answers[0].payload.dottedQuad(), "192.0.2.1")
        answers, _, _ = await r.lookupIPV6Address("example.org")
        self.assertEqual(answers[0].type, dns.AAAA)
        answers, _, _ = await r.lookupMailExchange("example.org")
        self.assertEqual(answers[0].payload.name.name, b"mx.example.org")
        answers, _, _ = await r.lookupText("example.org")
        self.assertEqual(answers[0].payload.data, [b"v=spf1 -all"])
        answers, _, _ = await r.lookupPointer("1.2.0.192.in-addr.arpa")
        self.assertEqual(answers[0].payload.name.name, b"mx.example.org")
        answers, _, _ = await r.lookupText("big.example.org")
        self.assertEqual(len(b"".join(answers[0].payload.data)), 1000)
        with self.assertRaises(DNSNameError):
            await r.lookupAddress("nowhere.example.org")

    async def test_subprocess(self) -> None:
        """DNSServer runs the same server in a subprocess for end-to-end tests."""
        path = self.mktemp()
        os.makedirs(path)
        server = DNSServer(ZONE, path)
        server.start()
        self.addCleanup(server.stop)
        r = client.Resolver(servers=[server.address], reactor=reactor)
        answers, _, _ = await r.lookupMailExchange("example.org")
        self.assertEqual(answers[0].payload.preference, 10)
