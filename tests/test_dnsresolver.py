"""Tests for mailstack.dnsresolver.build: which servers the shared resolver asks."""

from __future__ import annotations

from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.names import hosts, resolve
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import config as configmod
from mailstack import dnsresolver


class BuildTests(SynchronousTestCase):
    def test_configuredServersOnly(self) -> None:
        """With [dns] nameservers the resolver asks them (through the cache), not the hosts file."""
        cfg = configmod.from_mapping({"dns": {"nameservers": ["127.0.0.1:5353"]}})
        resolver = dnsresolver.build(cfg, Clock())
        verifyObject(IResolver, resolver)
        self.assertIsInstance(resolver, dnsresolver.CachingResolver)

    def test_relayNameserversAsFallback(self) -> None:
        """An empty [dns] nameservers falls back to relay.nameservers."""
        cfg = configmod.from_mapping({"relay": {"nameservers": ["127.0.0.1:5353"]}})
        self.assertEqual(dnsresolver.nameservers(cfg), [("127.0.0.1", 5353)])

    def test_systemResolverReadsHostsFirst(self) -> None:
        """Without configured servers, /etc/hosts answers before resolv.conf's servers,
        as the system resolver does: a smarthost named ``localhost`` keeps working."""
        resolver = dnsresolver.build(configmod.from_mapping({}), Clock())
        self.assertIsInstance(resolver, resolve.ResolverChain)
        first, second = resolver.resolvers
        self.assertIsInstance(first, hosts.Resolver)
        self.assertIsInstance(second, dnsresolver.CachingResolver)
