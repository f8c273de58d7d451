"""Tests for mailstack.auth.throttle on a task.Clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import config
from mailstack.auth.throttle import LoginThrottle, account_key, peer_key
from mailstack.interfaces import ILoginThrottle, ILoginTicket

A = "192.0.2.1"
B = "198.51.100.7"


def make(**auth):
    settings = {"failure_delay": "1s", "max_failure_delay": "16s", "lockout_failures": 10, "lockout_time": "5m"}
    cfg = config.from_mapping({"auth": {**settings, **auth}})
    clock = Clock()
    return clock, LoginThrottle(clock, cfg.auth)


def now(d):
    """The result of a Deferred that has fired (this throttle answers at once)."""
    results = []
    d.addBoth(results.append)
    assert len(results) == 1, "the throttle did not answer at once"
    return results[0]


def begin(throttle, peer, account):
    """``throttle.begin``'s ticket or None."""
    return now(throttle.begin(peer, account))


def fail(t, peer, account, n=1):
    """``n`` complete failed attempts through begin/failed; the last reply delay."""
    delay = 0.0
    for _ in range(n):
        ticket = begin(t, peer, account)
        assert ticket is not None, (peer, account)
        delay = now(ticket.failed())
    return delay



def refused(throttle: LoginThrottle, peer: str, account: str) -> bool:
    """Whether ``begin`` refuses now (an attempt it grants is released uncounted)."""
    ticket = begin(throttle, peer, account)
    if ticket is not None:
        ticket.abandoned()
    return ticket is None

class InterfaceTests(SynchronousTestCase):
    def test_interfaces(self):
        """LoginThrottle provides ILoginThrottle and the compatibility calls; its tickets ILoginTicket."""
        _, t = make()
        verifyObject(ILoginThrottle, t)
        verifyObject(ILoginTicket, begin(t, A, "a@localhost"))


class NoAccountLockoutTests(SynchronousTestCase):
    def test_distributedFailuresDoNotLockAccount(self):
        """Failures against one account from many addresses never refuse it from a fresh address."""
        _, t = make()
        for i in range(40):
            fail(t, f"203.0.113.{i}", "alice@localhost")
        ticket = begin(t, B, "alice@localhost")
        self.assertIsNotNone(ticket)
        self.assertFalse(refused(t, B, "alice@localhost"))

    def test_accountSlowedWithGrowingDelay(self):
        """Past lockout_failures from anywhere, each attempt on the account waits longer before its check."""
        _, t = make(lockout_failures=3)
        for i in range(3):
            fail(t, f"203.0.113.{i}", "alice@localhost")
        delays = []
        for i in range(6):
            ticket = begin(t, f"203.0.113.{100 + i}", "alice@localhost")
            delays.append(ticket.delay)
            ticket.failed()
        self.assertEqual(delays, [1, 2, 4, 8, 16, 16])
        self.assertEqual(begin(t, B, "bob@localhost").delay, 0)

    def test_inFlightAttemptsCountForAccountDelay(self):
        """Parallel attempts on an account from many addresses are slowed as if they had failed."""
        _, t = make(lockout_failures=2)
        delays = [begin(t, f"203.0.113.{i}", "alice@localhost").delay for i in range(5)]
        self.assertEqual(delays, [0, 0, 1, 2, 4])

    def test_knownPeerNeitherSlowedNorRefused(self):
        """A peer that logged in to the account recently is not slowed by the account's failures,
        nor refused by failures from its own address against other accounts."""
        _, t = make(lockout_failures=3)
        begin(t, A, "alice@localhost").succeeded()
        for i in range(10):
            fail(t, f"203.0.113.{i}", "alice@localhost")
        fail(t, A, "mallory@localhost", 3)  # someone behind the same address
        self.assertIsNone(begin(t, A, "bob@localhost"))
        ticket = begin(t, A, "alice@localhost")
        self.assertIsNotNone(ticket)
        self.assertEqual(ticket.delay, 0)

    def test_knownPeerStillLimitedByItsPairCount(self):
        """A known peer that then fails lockout_failures times for that account is refused for it."""
        _, t = make(lockout_failures=3)
        begin(t, A, "alice@localhost").succeeded()
        fail(t, A, "alice@localhost", 3)
        self.assertIsNone(begin(t, A, "alice@localhost"))

    def test_knownPeerForgottenAfterTrustTime(self):
        """Being known for an account lasts trust_time."""
        clock = Clock()
        t = LoginThrottle(clock, config.from_mapping({"auth": {"lockout_failures": 2}}).auth, trust_time=3600)
        begin(t, A, "alice@localhost").succeeded()
        for i in range(3):
            fail(t, f"203.0.113.{i}", "alice@localhost")
        self.assertEqual(begin(t, A, "alice@localhost").delay, 0)
        clock.advance(3600)
        for i in range(3):  # the account's count had expired too: fresh failures
            fail(t, f"203.0.113.{10 + i}", "alice@localhost")
        self.assertGreater(begin(t, A, "alice@localhost").delay, 0)


class PeerLockoutTests(SynchronousTestCase):
    def test_peerLockedForEveryAccount(self):
        """lockout_failures from one address refuse that address for any account, not others."""
        _, t = make(lockout_failures=3)
        for i in range(3):
            self.assertFalse(refused(t, A, "x@localhost"))
            fail(t, A, f"u{i}@localhost")
        self.assertIsNone(begin(t, A, "x@localhost"))
        self.assertTrue(refused(t, A, "x@localhost"))
        self.assertIsNotNone(begin(t, B, "x@localhost"))

    def test_parallelAttemptsReserved(self):
        """30 simultaneous attempts from one address: only lockout_failures get a ticket (a check)."""
        _, t = make(lockout_failures=10)
        tickets = [begin(t, A, "alice@localhost") for _ in range(30)]
        granted = [x for x in tickets if x is not None]
        self.assertEqual(len(granted), 10)
        for ticket in granted:
            ticket.failed()
        self.assertIsNone(begin(t, A, "alice@localhost"))

    def test_parallelAttemptsOverManyAccounts(self):
        """Simultaneous attempts naming different accounts are reserved against the address too."""
        _, t = make(lockout_failures=10)
        granted = [x for x in (begin(t, A, f"u{i}@localhost") for i in range(30)) if x is not None]
        self.assertEqual(len(granted), 10)

    def test_releasedReservationFreesSlot(self):
        """A finished successful or abandoned attempt no longer counts."""
        _, t = make(lockout_failures=2)
        first, second = begin(t, A, "a@localhost"), begin(t, A, "b@localhost")
        self.assertIsNone(begin(t, A, "c@localhost"))
        first.succeeded()
        second.abandoned()
        self.assertIsNotNone(begin(t, A, "c@localhost"))

    def test_successDoesNotResetPeerFailures(self):
        """With one valid account an attacker still gets only lockout_failures failures per address."""
        _, t = make(lockout_failures=10)
        failures = 0
        for i in range(40):
            if i % 5 == 0:
                ticket = begin(t, A, "mine@localhost")
                if ticket is not None:
                    ticket.succeeded()
            ticket = begin(t, A, f"victim{i}@localhost")
            if ticket is None:
                continue
            ticket.failed()
            failures += 1
        self.assertEqual(failures, 10)

    def test_successForgetsPairFailures(self):
        """A success forgets that pair's failures (a typo, then the right password)."""
        _, t = make(lockout_failures=3)
        fail(t, A, "alice@localhost", 2)
        begin(t, A, "alice@localhost").succeeded()
        fail(t, B, "x@localhost")  # unrelated
        self.assertFalse(t._over(t._pairs.get((peer_key(A), account_key("alice@localhost")), 0)))

    def test_lockoutExpires(self):
        """A lockout ends lockout_time after the last failure, and the counts are forgotten."""
        clock, t = make(lockout_failures=2, lockout_time="5m")
        fail(t, A, "a@localhost", 2)
        clock.advance(299)
        self.assertTrue(refused(t, A, "a@localhost"))
        clock.advance(1)
        self.assertFalse(refused(t, A, "a@localhost"))
        self.assertEqual(fail(t, A, "a@localhost"), 1)

    def test_noLockoutWhenZero(self):
        """lockout_failures = 0 never refuses and never slows an account."""
        _, t = make(lockout_failures=0)
        fail(t, A, "a@localhost", 50)
        ticket = begin(t, A, "a@localhost")
        self.assertEqual(ticket.delay, 0)
        self.assertFalse(refused(t, A, "a@localhost"))

    def test_ipv6PeersBySlash64(self):
        """IPv6 addresses in one /64 are one peer; another /64 is another; v4-mapped is the v4 peer."""
        _, t = make(lockout_failures=2)
        fail(t, "2001:db8:1:2::1", "a@localhost")
        fail(t, "2001:db8:1:2:ffff::9", "b@localhost")
        self.assertIsNone(begin(t, "2001:db8:1:2::77", "c@localhost"))
        self.assertIsNotNone(begin(t, "2001:db8:1:3::1", "c@localhost"))
        self.assertEqual(peer_key("::ffff:192.0.2.1"), "192.0.2.1")

    def test_peerKeyParsedOnce(self):
        """A peer's key is worked out once and then remembered, in a bounded cache."""
        peer_key.cache_clear()
        self.assertEqual([peer_key("2001:db8:1:2::1") for _ in range(3)], ["2001:db8:1:2::/64"] * 3)
        info = peer_key.cache_info()
        self.assertEqual((info.misses, info.hits), (1, 2))
        self.assertIsNotNone(info.maxsize)


class DelayTests(SynchronousTestCase):
    def test_replyDelayDoublesToCeiling(self):
        """Each failure from one peer doubles the reply delay up to max_failure_delay."""
        _, t = make(failure_delay="1s", max_failure_delay="5s", lockout_failures=0)
        self.assertEqual([fail(t, A, f"u{i}@localhost") for i in range(5)], [1, 2, 4, 5, 5])

    def test_replyDelayPerPeer(self):
        """Another peer starts again at failure_delay."""
        _, t = make()
        fail(t, A, "a@localhost", 2)
        self.assertEqual(fail(t, B, "b@localhost"), 1)

    def test_ticketEndsOnce(self):
        """Only the first verdict on a ticket counts."""
        _, t = make(lockout_failures=3)
        ticket = begin(t, A, "a@localhost")
        ticket.failed()
        self.assertEqual(now(ticket.failed()), 0)
        ticket.succeeded()
        self.assertEqual(t._peers.get(peer_key(A), 0).failures, 1)


class BoundedTests(SynchronousTestCase):
    def test_tablesCapped(self):
        """Each table keeps at most max_entries (least recently used dropped)."""
        clock = Clock()
        t = LoginThrottle(clock, config.from_mapping({}).auth, max_entries=100)
        for i in range(1000):
            fail(t, f"10.0.{i // 256}.{i % 256}", f"user{i}@localhost")
        self.assertEqual((len(t._peers), len(t._pairs), len(t._accounts)), (100, 100, 100))

    def test_longLoginNamesHashed(self):
        """The key of a login name is 16 bytes however long the name; case does not matter."""
        self.assertEqual(len(account_key("x" * 100_000)), 16)
        self.assertEqual(account_key("Alice@Localhost"), account_key("alice@localhost"))


