"""Tests for mailstack.net."""

from twisted.trial.unittest import SynchronousTestCase

from mailstack.net import is_loopback


class LoopbackTests(SynchronousTestCase):
    def test_isLoopback(self) -> None:
        """127.0.0.0/8, ::1 and IPv4-mapped loopback are loopback; other and unparsable hosts are not."""
        for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "::1%lo"):
            self.assertTrue(is_loopback(host), host)
        for host in ("10.0.0.1", "192.0.2.7", "::ffff:10.0.0.1", "2001:db8::1", "", "localhost", "not an address"):
            self.assertFalse(is_loopback(host), host)
