"""Tests for mailstack.auth.sasl: PLAIN (RFC 4616) and LOGIN decoding."""

import base64

from twisted.trial.unittest import SynchronousTestCase

from mailstack.auth import sasl


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class DecodeResponseTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Strict base64; '*' cancels and '=' is empty only where the caller allows it."""
        ok = [
            ((b64(b"abc"), True, True), b"abc"),
            ((b"=", True, True), b""),
            ((b"", True, True), b""),
        ]
        for (line, cancel_ok, empty_ok), expected in ok:
            self.assertEqual(sasl.decode_response(line, cancel_ok, empty_ok), expected, line)
        bad = [
            ((b"*", True, True), sasl.Cancelled),
            ((b"*", False, True), sasl.BadBase64),
            ((b"=", True, False), sasl.BadBase64),
            ((b"not base64!", True, True), sasl.BadBase64),
            ((b"YWJj\xff", True, True), sasl.BadBase64),
            ((b"YWJ", True, True), sasl.BadBase64),
        ]
        for (line, cancel_ok, empty_ok), error in bad:
            self.assertRaises(error, sasl.decode_response, line, cancel_ok, empty_ok)


class PlainTests(SynchronousTestCase):
    def test_credentials(self) -> None:
        """authcid and password; an authzid equal to the authcid is fine, another one gives password None."""
        self.assertEqual(sasl.plain_credentials(b"\0alice\0pw"), (b"alice", b"pw"))
        self.assertEqual(sasl.plain_credentials(b"alice\0alice\0pw"), (b"alice", b"pw"))
        self.assertEqual(sasl.plain_credentials(b"bob\0alice\0pw"), (b"alice", None))
        self.assertEqual(sasl.decode_plain(b"z\0a\0"), (b"z", b"a", b""))

    def test_malformed(self) -> None:
        """Not three NUL-separated parts, or an empty authcid, is Malformed."""
        for message in (b"", b"alice", b"\0alice", b"\0\0pw", b"a\0b\0c\0d"):
            self.assertRaises(sasl.Malformed, sasl.decode_plain, message)


class ExchangeTests(SynchronousTestCase):
    def test_plain(self) -> None:
        """PLAIN: an empty challenge, then the credentials from one response."""
        exchange = sasl.Exchange("PLAIN")
        self.assertEqual(exchange.challenge, b"")
        self.assertEqual(exchange.step(b"\0alice\0pw"), (b"alice", b"pw"))

    def test_login(self) -> None:
        """LOGIN: Username: and Password: prompts, then the credentials."""
        exchange = sasl.Exchange("LOGIN")
        self.assertEqual(base64.b64decode(exchange.challenge), b"Username:")
        self.assertEqual(base64.b64decode(exchange.step(b"alice")), b"Password:")
        self.assertEqual(exchange.step(b"pw"), (b"alice", b"pw"))

    def test_unknownMechanism(self) -> None:
        """Only PLAIN and LOGIN are known."""
        self.assertRaises(ValueError, sasl.Exchange, "CRAM-MD5")
