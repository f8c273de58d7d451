"""Tests for mailstack.ratelimit: a rolling-hour counter on an injected clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.interfaces import IRateLimit
from mailstack.ratelimit import RateLimiter


class RateLimiterTests(SynchronousTestCase):
    def test_limitReached(self) -> None:
        """After `limit` messages within the hour, the next is refused."""
        clock = Clock()
        rl = RateLimiter(clock, 3)
        for _ in range(3):
            self.assertTrue(rl.allowed("a"))
            rl.record("a")
        self.assertFalse(rl.allowed("a"))
        self.assertTrue(rl.allowed("b"))

    def test_rollingWindow(self) -> None:
        """Each message stops counting exactly one hour after it was sent."""
        clock = Clock()
        rl = RateLimiter(clock, 2)
        rl.record("a")
        clock.advance(1800)
        rl.record("a")
        self.assertFalse(rl.allowed("a"))
        clock.advance(1799)
        self.assertFalse(rl.allowed("a"))
        clock.advance(1)
        self.assertTrue(rl.allowed("a"))
        self.assertEqual(rl.count("a"), 1)
        clock.advance(1800)
        self.assertEqual(rl.count("a"), 0)

    def test_zeroIsUnlimited(self) -> None:
        """limit 0 disables the limit."""
        rl = RateLimiter(Clock(), 0)
        for _ in range(1000):
            rl.record("a")
        self.assertTrue(rl.allowed("a"))

    def test_admitCountsOnlyWhatItLetsThrough(self) -> None:
        """admit (IRateLimit) lets `limit` events through and counts them; a refused one is not counted."""
        clock = Clock()
        rl = RateLimiter(clock, 2)
        verifyObject(IRateLimit, rl)
        self.assertEqual([self.successResultOf(rl.admit("a")) for _ in range(4)], [True, True, False, False])
        self.assertEqual(rl.count("a"), 2)
