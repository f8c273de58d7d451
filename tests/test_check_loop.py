"""Loop detection: more than 50 Received: fields is refused 554 5.4.6 (RFC 5321 section 6.3)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.checks.loop import TOO_MANY_HOPS, LoopCheck, build
from mailstack.interfaces import IMessageCheck
from mailstack.pipeline import Connection, Transaction, Verdict
from tests.test_pipeline import FakeMessage

CONN = Connection("192.0.2.7", "smtp", "mx.example.org")


def message(hops: int, name: bytes = b"Received") -> FakeMessage:
    return FakeMessage(*[name + b": from a by b; Mon, 1 Dec 2025 10:00:00 +0000\r\n"] * hops, b"Subject: s\r\n")


class LoopTests(SynchronousTestCase):
    def test_interface(self):
        """The check provides IMessageCheck and applies to MX and submission sessions."""
        check = LoopCheck()
        verifyObject(IMessageCheck, check)
        self.assertTrue(check.mx and check.submission)

    def test_fiftyIsAccepted(self):
        """50 Received: fields pass."""
        self.assertIsNone(LoopCheck().data(CONN, Transaction(None, {}), message(50)))

    def test_fiftyOneIsRefused(self):
        """51 Received: fields (any case) are refused with 554 5.4.6."""
        for name in (b"Received", b"RECEIVED", b"received"):
            verdict = LoopCheck().data(CONN, Transaction(None, {}), message(51, name))
            self.assertEqual(verdict, Verdict(reply=TOO_MANY_HOPS))
        self.assertEqual((TOO_MANY_HOPS.code, TOO_MANY_HOPS.enhanced), (554, "5.4.6"))

    def test_option(self):
        """max_received sets the limit; anything but a positive integer is refused."""
        check = build(None, {"max_received": 3})
        self.assertIsNone(check.data(CONN, Transaction(None, {}), message(3)))
        self.assertIsNotNone(check.data(CONN, Transaction(None, {}), message(4)))
        for bad in ({"max_received": 0}, {"max_received": "5"}, {"max_received": True}, {"other": 1}):
            self.assertRaises(ValueError, build, None, bad)
