"""Tests for mailstack.netpolicy: private relay targets and the server's own addresses."""

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from mailstack.netpolicy import is_own_address, is_private_literal


class PrivateLiteralTests(SynchronousTestCase):
    def test_privateRanges(self) -> None:
        """Loopback, link-local, RFC 1918, ULA, unspecified and CGNAT addresses are private."""
        for text in (
            "127.0.0.1", "127.255.0.9", "169.254.169.254", "10.1.2.3", "172.16.0.1", "172.31.255.255",
            "192.168.1.1", "0.0.0.0", "0.1.2.3", "100.64.0.1", "100.127.255.254",
            "::1", "::", "fe80::1", "fe80::1%eth0", "fd12:3456::1", "fc00::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1",
        ):
            self.assertTrue(is_private_literal(text), text)

    def test_publicAddresses(self) -> None:
        """Globally routed addresses, and the neighbours of each range, are not private."""
        for text in (
            "8.8.8.8", "172.15.255.255", "172.32.0.0", "100.63.255.255", "100.128.0.0", "11.0.0.1",
            "192.169.0.1", "2001:4860:4860::8888", "fe00::1", "::ffff:8.8.8.8",
        ):
            self.assertFalse(is_private_literal(text), text)

    def test_ipaddressObjects(self) -> None:
        """ipaddress objects are accepted as well as text."""
        self.assertTrue(is_private_literal(ipaddress.ip_address("10.0.0.1")))

    def test_notAnAddress(self) -> None:
        """A name is no literal: ValueError."""
        self.assertRaises(ValueError, is_private_literal, "mx.example.org")


class OwnAddressTests(SynchronousTestCase):
    def test_exactListener(self) -> None:
        """An address a listener binds to is ours; another is not."""
        self.assertTrue(is_own_address("192.0.2.25", ["192.0.2.25", "::1"]))
        self.assertTrue(is_own_address("::ffff:192.0.2.25", ["192.0.2.25"]))
        self.assertFalse(is_own_address("192.0.2.26", ["192.0.2.25", "::1"]))

    def test_wildcardListener(self) -> None:
        """A wildcard listener covers loopback of its family; :: covers both families."""
        self.assertTrue(is_own_address("127.0.0.2", ["0.0.0.0"]))
        self.assertFalse(is_own_address("::1", ["0.0.0.0"]))
        self.assertTrue(is_own_address("127.0.0.1", ["::"]))
        self.assertTrue(is_own_address("::1", ["::"]))
        self.assertFalse(is_own_address("192.0.2.1", ["0.0.0.0"]))
        self.assertTrue(is_own_address("192.0.2.1", ["0.0.0.0", "192.0.2.1"]))
