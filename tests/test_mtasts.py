"""Tests for mailstack.mtasts (RFC 8461) and mailstack.trust.

The policy logic runs against an in-memory twisted.names resolver, a fake
fetcher and a Clock.  The HTTPS fetch runs real TLS in memory (iosim) against a
twisted.web server whose certificate comes from a test CA made here.
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from service_identity.exceptions import VerificationError
from twisted.internet import defer
from twisted.internet.interfaces import IResolver
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import common, dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack import mtasts, trust

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\nmx: *.backup.example.org\r\nmax_age: 86400\r\n"


class FakeResolver(common.ResolverBase):
    """twisted.names resolver answering from a dict {(name, type): [payload, ...]};
    a name mapped to an exception instance fails with it."""

    def __init__(self, records):
        super().__init__()
        self.records = records
        self.queries = []

    def _lookup(self, name, cls, type, timeout):
        name = name.decode() if isinstance(name, bytes) else name
        self.queries.append((name, type))
        found = self.records.get((name, type))
        if isinstance(found, Exception):
            return defer.fail(found)
        if found is None:
            if any(n == name for n, _ in self.records):
                return defer.succeed(([], [], []))
            return defer.fail(DNSNameError(name))
        answers = [dns.RRHeader(name=name, type=type, payload=p, ttl=300) for p in found]
        return defer.succeed((answers, [], []))


@implementer(mtasts.IPolicyFetcher)
class FakeFetcher:
    """Returns ``body`` (or fails with it when it is an exception); counts calls."""

    def __init__(self, body=POLICY):
        self.body = body
        self.calls = 0

    def fetch(self, domain):
        self.calls += 1
        if isinstance(self.body, Exception):
            return defer.fail(self.body)
        return defer.succeed(self.body)


def txt(text):
    return dns.Record_TXT(text.encode())


def blocking(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class ParseTests(SynchronousTestCase):
    def test_policy(self):
        """A policy parses into mode, mx patterns and max_age; unknown keys are ignored."""
        policy = mtasts.parse_policy(POLICY + b"extension: x\n")
        self.assertEqual(policy.mode, "enforce")
        self.assertEqual(policy.mx, ("mx1.example.org", "*.backup.example.org"))
        self.assertEqual(policy.max_age, 86400)

    def test_badPolicies(self):
        """Missing version, bad mode, bad max_age, no mx, junk lines are PolicyErrors."""
        for body in [
            b"mode: enforce\nmx: a\nmax_age: 1\n",
            b"version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
            b"version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
            b"version: STSv1\nmode: enforce\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\nnot a field\n",
            b"\xff\xfe",
        ]:
            self.assertRaises(mtasts.PolicyError, mtasts.parse_policy, body)

    def test_modeNoneAndMaxAgeCap(self):
        """Mode none needs no mx; max_age is capped at one year."""
        policy = mtasts.parse_policy(b"version: STSv1\nmode: none\nmax_age: 9999999999\n")
        self.assertEqual((policy.mode, policy.max_age), ("none", 31557600))

    def test_txt(self):
        """Exactly one v=STSv1 record with a valid id gives that id; anything else none."""
        self.assertEqual(mtasts.parse_txt([b"v=STSv1; id=20260101T0000;", b"v=spf1 -all"]), "20260101T0000")
        self.assertIsNone(mtasts.parse_txt([b"v=STSv1; id=a", b"v=STSv1; id=b"]))
        self.assertIsNone(mtasts.parse_txt([b"v=STSv1; id=bad-id!"]))
        self.assertIsNone(mtasts.parse_txt([b"v=STSv10; id=a"]))
        self.assertIsNone(mtasts.parse_txt([]))

    def test_mxAllowed(self):
        """Exact names match ignoring case and a final dot; *. stands for one leftmost label."""
        policy = mtasts.parse_policy(POLICY)
        self.assertTrue(mtasts.mx_allowed(policy, "MX1.example.org."))
        self.assertTrue(mtasts.mx_allowed(policy, "b1.backup.example.org"))
        self.assertFalse(mtasts.mx_allowed(policy, "a.b1.backup.example.org"))
        self.assertFalse(mtasts.mx_allowed(policy, "backup.example.org"))
        self.assertFalse(mtasts.mx_allowed(policy, "mx2.example.org"))


class LookupTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.resolver = FakeResolver({("_mta-sts.example.org", dns.TXT): [txt("v=STSv1; id=one")]})
        verifyObject(IResolver, self.resolver)
        self.fetcher = FakeFetcher()
        verifyObject(mtasts.IPolicyFetcher, self.fetcher)
        self.dir = os.path.abspath(self.mktemp())
        self.sts = self.make()

    def make(self):
        sts = mtasts.MTASTS(self.resolver, self.fetcher, self.dir, blocking, self.clock)
        verifyObject(mtasts.IMTASTS, sts)
        return sts

    def policy(self, sts=None, domain="example.org"):
        return self.successResultOf((sts or self.sts).policy(domain))

    def test_fetchAndCache(self):
        """The first lookup fetches; later ones within max_age use the cache, also after a restart."""
        first = self.policy()
        self.assertEqual((first.mode, first.id), ("enforce", "one"))
        self.assertEqual(self.policy(), first)
        self.assertEqual(self.policy(self.make()), first)
        self.assertEqual(self.fetcher.calls, 1)

    def test_refreshOnNewId(self):
        """A changed TXT id fetches the policy again."""
        self.policy()
        self.resolver.records[("_mta-sts.example.org", dns.TXT)] = [txt("v=STSv1; id=two")]
        self.fetcher.body = POLICY.replace(b"enforce", b"testing")
        policy = self.policy()
        self.assertEqual((policy.mode, policy.id, self.fetcher.calls), ("testing", "two", 2))

    def test_expiry(self):
        """After max_age the policy is fetched again even with the same id."""
        self.policy()
        self.clock.advance(86400)
        self.policy()
        self.assertEqual(self.fetcher.calls, 2)

    def test_noRecordNoPolicy(self):
        """A domain without the TXT record (NXDOMAIN or no TXT) has no policy and nothing is fetched."""
        self.assertIsNone(self.policy(domain="other.example"))
        self.assertEqual(self.fetcher.calls, 0)

    def test_cachedPolicyOutlivesRecordAndDNSFailure(self):
        """A valid cached policy applies when the TXT record vanishes or DNS fails (section 5.1)."""
        first = self.policy()
        del self.resolver.records[("_mta-sts.example.org", dns.TXT)]
        self.assertEqual(self.policy(), first)
        self.resolver.records[("_mta-sts.example.org", dns.TXT)] = DNSServerError("SERVFAIL")
        self.assertEqual(self.policy(), first)
        self.clock.advance(86400)
        self.assertIsNone(self.policy())

    def test_fetchFailure(self):
        """A failed fetch means no policy, and is not retried for RETRY_AFTER seconds."""
        self.fetcher.body = mtasts.PolicyError("HTTP 404")
        self.assertIsNone(self.policy())
        self.assertIsNone(self.policy())
        self.assertEqual(self.fetcher.calls, 1)
        self.clock.advance(mtasts.RETRY_AFTER)
        self.fetcher.body = POLICY
        self.assertEqual(self.policy().mode, "enforce")

    def test_fetchFailureKeepsValidCache(self):
        """A new id whose policy cannot be fetched leaves the still valid cached policy in force."""
        first = self.policy()
        self.resolver.records[("_mta-sts.example.org", dns.TXT)] = [txt("v=STSv1; id=two")]
        self.fetcher.body = b"garbage"
        self.assertEqual(self.policy(), first)

    def test_modeNone(self):
        """Mode none gives None to the relay but is cached like any policy."""
        self.fetcher.body = b"version: STSv1\nmode: none\nmax_age: 600\n"
        self.assertIsNone(self.policy())
        self.assertIsNone(self.policy())
        self.assertEqual(self.fetcher.calls, 1)

    def test_concurrentLookupsShared(self):
        """Calls for one domain while a lookup runs share it: one TXT query, one fetch."""
        gate = defer.Deferred()
        self.fetcher.fetch = lambda domain: gate
        d1, d2 = self.sts.policy("example.org"), self.sts.policy("EXAMPLE.org")
        self.assertNoResult(d1)
        gate.callback(POLICY)
        self.assertEqual(self.successResultOf(d1), self.successResultOf(d2))
        self.assertEqual(len([q for q in self.resolver.queries if q[1] == dns.TXT]), 1)

    def test_literal(self):
        """An address literal has no policy and causes no lookup."""
        self.assertIsNone(self.policy(domain="192.0.2.1"))
        self.assertEqual(self.resolver.queries, [])

    def test_damagedCacheFile(self):
        """A damaged cache file is ignored and the policy fetched again."""
        self.policy()
        with open(os.path.join(self.dir, "example.org.json"), "wb") as f:
            f.write(b"{not json")
        self.assertEqual(self.policy(self.make()).mode, "enforce")
        self.assertEqual(self.fetcher.calls, 2)


# -- the HTTPS fetch over real TLS in memory ----------------------------------------------


def make_ca(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(ca_key, ca_cert, hostname):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


CA_KEY, CA_CERT = make_ca("mailstack test CA")
OTHER_CA_KEY, OTHER_CA_CERT = make_ca("someone else's CA")


class PolicyResource(Resource):
    isLeaf = True

    def __init__(self, body=POLICY, code=200, ctype=b"text/plain; charset=utf-8", location=None):
        super().__init__()
        self.body, self.code, self.ctype, self.location = body, code, ctype, location
        self.paths = []

    def render_GET(self, request):
        self.paths.append((request.getRequestHostname(), request.path))
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", self.ctype)
        if self.location:
            request.setHeader(b"location", self.location)
        return self.body


class FetchTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver({("mta-sts.example.org", dns.A): [dns.Record_A("127.0.0.1")]})
        self.ca_file = os.path.abspath(self.mktemp())
        with open(self.ca_file, "wb") as f:
            f.write(CA_CERT.public_bytes(serialization.Encoding.PEM))

    def fetch(self, resource, ca=(CA_KEY, CA_CERT), hostname="mta-sts.example.org"):
        """Start a fetch and connect it, in memory, to a server for ``hostname``
        whose certificate is issued by ``ca``; returns the fetch's Deferred."""
        fetcher = mtasts.PolicyFetcher(
            mtasts.https_agent(self.reactor, self.resolver, trust.trust_root(self.ca_file)), self.reactor
        )
        verifyObject(mtasts.IPolicyFetcher, fetcher)
        d = fetcher.fetch("example.org")
        host, port, client_factory, _, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 443))
        key, cert = make_leaf(ca[0], ca[1], hostname)
        options = CertificateOptions(privateKey=key, certificate=cert)
        site = Site(resource, reactor=self.reactor)
        server = TLSMemoryBIOFactory(options, False, site, clock=self.reactor).buildProtocol(None)
        client = client_factory.buildProtocol(None)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False)
        for _ in range(20):  # TLS batches writes until the clock's next turn
            pump.flush()
            self.reactor.advance(0)
        return d

    def test_verifiedFetch(self):
        """A policy served with a certificate from a trusted CA for mta-sts.DOMAIN is fetched."""
        resource = PolicyResource()
        body = self.successResultOf(self.fetch(resource))
        self.assertEqual(body, POLICY)
        self.assertEqual(resource.paths, [(b"mta-sts.example.org", b"/.well-known/mta-sts.txt")])

    def test_untrustedCertificate(self):
        """A certificate from a CA outside the system store and tls_ca_file fails the fetch."""
        failure = self.failureResultOf(self.fetch(PolicyResource(), ca=(OTHER_CA_KEY, OTHER_CA_CERT)))
        self.assertIn("certificate verify failed", str(failure.value.reasons[0].value))

    def test_wrongName(self):
        """A trusted certificate for another name fails the fetch."""
        failure = self.failureResultOf(self.fetch(PolicyResource(), hostname="www.example.org"))
        self.assertTrue(failure.value.reasons[0].check(VerificationError))

    def test_redirectNotFollowed(self):
        """A 3xx is a failure, not followed (RFC 8461 section 3.3)."""
        resource = PolicyResource(code=302, location=b"https://mta-sts.example.org/other")
        failure = self.failureResultOf(self.fetch(resource), mtasts.PolicyError)
        self.assertIn("302", str(failure.value))
        self.assertEqual(len(resource.paths), 1)

    def test_wrongContentType(self):
        """A policy not served as text/plain is refused."""
        self.failureResultOf(self.fetch(PolicyResource(ctype=b"text/html")), mtasts.PolicyError)

    def test_sizeLimit(self):
        """A body over 64 KB is refused."""
        body = POLICY + b"x: " + b"y" * mtasts.MAX_POLICY_SIZE + b"\n"
        self.failureResultOf(self.fetch(PolicyResource(body=body)), mtasts.PolicyError)

    def test_timeout(self):
        """A server that never answers fails the fetch after FETCH_TIMEOUT."""
        fetcher = mtasts.PolicyFetcher(
            mtasts.https_agent(self.reactor, self.resolver, trust.trust_root(self.ca_file)), self.reactor
        )
        d = fetcher.fetch("example.org")
        self.assertNoResult(d)
        self.reactor.advance(mtasts.FETCH_TIMEOUT)
        self.failureResultOf(d)

    def test_stalledBody(self):
        """A server that starts the body and stalls fails the fetch after FETCH_TIMEOUT."""

        class Stalling(PolicyResource):
            def render_GET(self, request):
                request.setHeader(b"content-type", b"text/plain")
                request.write(b"version: STSv1\n")
                self.request = request
                return NOT_DONE_YET

        resource = Stalling()
        d = self.fetch(resource)
        self.assertNoResult(d)
        self.reactor.advance(mtasts.FETCH_TIMEOUT)
        self.failureResultOf(d, defer.TimeoutError)

    def test_noAddress(self):
        """A policy host without an address fails the fetch."""
        self.resolver.records.clear()
        fetcher = mtasts.PolicyFetcher(
            mtasts.https_agent(self.reactor, self.resolver, trust.trust_root(self.ca_file)), self.reactor
        )
        self.failureResultOf(fetcher.fetch("example.org"), mtasts.PolicyError)


class BuildTests(SynchronousTestCase):
    def test_build(self):
        """build() wires resolver, verified fetcher and the cache folder under data_dir."""
        resolver = FakeResolver({})
        data = os.path.abspath(self.mktemp())
        sts = mtasts.build(MemoryReactorClock(), resolver, data, "", blocking)
        verifyObject(mtasts.IMTASTS, sts)
        self.assertEqual(sts.disk.folder, os.path.join(data, "mta-sts"))
        self.assertIsNone(self.successResultOf(sts.policy("example.org")))
        self.assertRaises(
            trust.TrustError, mtasts.build, MemoryReactorClock(), resolver, data, "/nonexistent", blocking
        )


class TrustTests(SynchronousTestCase):
    def test_badCAFile(self):
        """A missing or non-PEM CA file is a TrustError naming it."""
        missing = os.path.abspath(self.mktemp())
        self.assertRaises(trust.TrustError, trust.trust_root, missing)
        with open(missing, "wb") as f:
            f.write(b"not a certificate")
        error = self.assertRaises(trust.TrustError, trust.trust_root, missing)
        self.assertIn(missing, str(error))
        verifyObject(trust.IOpenSSLTrustRoot, trust.trust_root(""))
