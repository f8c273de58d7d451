"""Tests for mailstack.auth.throttle on a task.Clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import config
from mailstack.auth.throttle import LoginThrottle
from mailstack.interfaces import ILoginThrottle


def make(**auth):
    cfg = config.from_mapping({"auth": auth})
    clock = Clock()
    return clock, LoginThrottle(clock, cfg.auth)


class ThrottleTests(SynchronousTestCase):
    def test_interface(self):
        """LoginThrottle provides ILoginThrottle."""
        verifyObject(ILoginThrottle, make()[1])

    def test_delayDoublesToCeiling(self):
        """Each failure from one peer doubles the delay up to max_failure_delay."""
        _, t = make(failure_delay="1s", max_failure_delay="5s", lockout_failures=0)
        delays = [t.failed("192.0.2.1", f"u{i}@localhost") for i in range(5)]
        self.assertEqual(delays, [1, 2, 4, 5, 5])

    def test_delayPerPeer(self):
        """Another peer starts again at failure_delay."""
        _, t = make(failure_delay="1s")
        t.failed("192.0.2.1", "a@localhost")
        t.failed("192.0.2.1", "a@localhost")
        self.assertEqual(t.failed("192.0.2.2", "b@localhost"), 1)

    def test_peerLockout(self):
        """lockout_failures from one peer lock that peer out, for any account."""
        clock, t = make(lockout_failures=3, lockout_time="5m")
        for i in range(3):
            self.assertFalse(t.locked("192.0.2.1", "x@localhost"))
            t.failed("192.0.2.1", f"u{i}@localhost")
        self.assertTrue(t.locked("192.0.2.1", "x@localhost"))
        self.assertFalse(t.locked("192.0.2.2", "x@localhost"))

    def test_accountLockout(self):
        """lockout_failures against one account from many peers lock the account."""
        _, t = make(lockout_failures=3)
        for i in range(3):
            t.failed(f"192.0.2.{i}", "alice@localhost")
        self.assertTrue(t.locked("198.51.100.1", "alice@localhost"))
        self.assertFalse(t.locked("198.51.100.1", "bob@localhost"))

    def test_lockoutExpires(self):
        """A lockout ends after lockout_time and the failures are forgotten."""
        clock, t = make(lockout_failures=2, lockout_time="5m", failure_delay="1s")
        t.failed("192.0.2.1", "a@localhost")
        t.failed("192.0.2.1", "a@localhost")
        clock.advance(299)
        self.assertTrue(t.locked("192.0.2.1", "a@localhost"))
        clock.advance(1)
        self.assertFalse(t.locked("192.0.2.1", "a@localhost"))
        self.assertEqual(t.failed("192.0.2.1", "a@localhost"), 1)

    def test_noLockoutWhenZero(self):
        """lockout_failures = 0 never locks."""
        _, t = make(lockout_failures=0)
        for _ in range(50):
            t.failed("192.0.2.1", "a@localhost")
        self.assertFalse(t.locked("192.0.2.1", "a@localhost"))

    def test_successForgetsPeer(self):
        """A successful login resets the peer's delay."""
        _, t = make(failure_delay="1s", lockout_failures=0)
        t.failed("192.0.2.1", "a@localhost")
        t.failed("192.0.2.1", "a@localhost")
        t.succeeded("192.0.2.1", "a@localhost")
        self.assertEqual(t.failed("192.0.2.1", "a@localhost"), 1)
