"""Tests for mailstack.connlimit."""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.connlimit import PER_IP, TOTAL, ConnectionLimiter
from mailstack.interfaces import IConnectionSlots


class ConnectionLimiterTests(SynchronousTestCase):
    def test_capsAndRelease(self) -> None:
        """The per-address cap and the total cap refuse with their reason; a released slot is reusable."""
        limiter = ConnectionLimiter(max_total=3, max_per_ip=2)
        self.assertIsNone(limiter.take("192.0.2.1"))
        self.assertIsNone(limiter.take("192.0.2.1"))
        self.assertEqual(limiter.take("192.0.2.1"), PER_IP)
        self.assertIsNone(limiter.take("192.0.2.2"))
        self.assertEqual(limiter.take("192.0.2.3"), TOTAL)
        limiter.release("192.0.2.1")
        self.assertIsNone(limiter.take("192.0.2.3"))
        self.assertEqual((limiter.total, dict(limiter.per_ip)), (3, {"192.0.2.1": 1, "192.0.2.2": 1, "192.0.2.3": 1}))

    def test_zeroMeansNoCap(self) -> None:
        """0 turns a cap off; released addresses leave no entry behind (the table stays small)."""
        limiter = ConnectionLimiter(0, 0)
        for _ in range(1000):
            self.assertIsNone(limiter.take("192.0.2.1"))
        for _ in range(1000):
            limiter.release("192.0.2.1")
        self.assertEqual((limiter.total, dict(limiter.per_ip)), (0, {}))

    def test_acquireAnswersAtOnce(self) -> None:
        """As IConnectionSlots the limiter answers with an already fired Deferred, and takes the slot."""
        limiter = ConnectionLimiter(1)
        verifyObject(IConnectionSlots, limiter)
        self.assertIsNone(self.successResultOf(limiter.acquire("192.0.2.1")))
        self.assertEqual(self.successResultOf(limiter.acquire("192.0.2.2")), TOTAL)
