"""Tests for mailstack.smtp.policy: listener rules, loopback, sender ownership."""

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import Address
from mailstack.net import is_loopback
from mailstack.smtp.policy import ListenerPolicy, auth_allowed, sender_owned
from tests.support.fakes import FakeAliases


class PolicyTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        """MX needs no AUTH; both submission kinds do; only plaintext kinds offer STARTTLS."""
        self.assertFalse(ListenerPolicy.for_kind("smtp").auth_required)
        self.assertTrue(ListenerPolicy.for_kind("submission").auth_required)
        self.assertTrue(ListenerPolicy.for_kind("submissions").auth_required)
        self.assertTrue(ListenerPolicy.for_kind("submission").offers_starttls)
        self.assertFalse(ListenerPolicy.for_kind("submissions").offers_starttls)
        self.assertRaises(ValueError, ListenerPolicy.for_kind, "lmtp")

    def test_loopback(self) -> None:
        """127/8, ::1 and v4-mapped loopback are loopback; other and junk are not."""
        for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(is_loopback(host), host)
        for host in ("192.0.2.1", "::2", "", "localhost", "::ffff:192.0.2.1"):
            self.assertFalse(is_loopback(host), host)

    def test_authAllowed(self) -> None:
        """AUTH over TLS always; in plaintext only from loopback when configured."""
        self.assertTrue(auth_allowed(True, "192.0.2.1", False))
        self.assertFalse(auth_allowed(False, "127.0.0.1", False))
        self.assertTrue(auth_allowed(False, "127.0.0.1", True))
        self.assertFalse(auth_allowed(False, "192.0.2.1", True))

    def test_senderOwned(self) -> None:
        """Own address (any case) and aliases that expand to the user, through chains."""
        aliases = FakeAliases()
        self.assertTrue(sender_owned(Address("Alice", "example.org"), "alice@example.org", aliases))
        self.assertTrue(sender_owned(Address("sales", "example.org"), "alice@example.org", aliases))
        self.assertTrue(sender_owned(Address("info", "example.org"), "alice@example.org", aliases))
        self.assertFalse(sender_owned(Address("team", "example.org"), "alice@example.org", aliases))
        self.assertFalse(sender_owned(Address("bob", "example.org"), "alice@example.org", aliases))
        self.assertFalse(sender_owned(None, "alice@example.org", aliases))

    def test_aliasLoopTerminates(self) -> None:
        """An alias loop does not hang the ownership check."""
        aliases = FakeAliases({"a@x.test": ["b@x.test"], "b@x.test": ["a@x.test"]})
        self.assertFalse(sender_owned(Address("a", "x.test"), "alice@example.org", aliases))
