"""Tests for mailstack.errors: replies on the wire and the failures that carry them."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailstack.errors import PermanentFailure, Reply, TemporaryFailure, failure_for


class ReplyTests(SynchronousTestCase):
    def test_classDigitChecked(self) -> None:
        """An enhanced code whose class digit differs from the reply's is refused at construction
        (RFC 3463 section 2), so no reply table can hold one."""
        self.assertRaises(ValueError, Reply, 550, "4.7.1", "mismatch")
        self.assertEqual(Reply(550, "5.7.1", "ok").enhanced, "5.7.1")
        self.assertEqual(Reply(354, "", "no enhanced code").enhanced, "")

    def test_encodeOneLine(self) -> None:
        """One line: code, space, enhanced code, text, CRLF."""
        self.assertEqual(Reply(250, "2.0.0", "Ok").encode(), b"250 2.0.0 Ok\r\n")
        self.assertEqual(Reply(354, "", "Go ahead").encode(), b"354 Go ahead\r\n")

    def test_encodeMultiLine(self) -> None:
        """Multi-line replies use '-' after the code on every line but the last, each line with
        the enhanced code (RFC 5321 section 4.2.1, RFC 2034 section 4)."""
        wire = Reply(452, "4.3.1", "first\nsecond").encode()
        self.assertEqual(wire, b"452-4.3.1 first\r\n452 4.3.1 second\r\n")

    def test_permanentAndTemporary(self) -> None:
        """5xx is permanent, 4xx temporary, 2xx neither."""
        self.assertEqual((Reply(550, "5.1.1", "x").permanent, Reply(550, "5.1.1", "x").temporary), (True, False))
        self.assertEqual((Reply(451, "4.3.0", "x").permanent, Reply(451, "4.3.0", "x").temporary), (False, True))
        self.assertEqual((Reply(250, "2.0.0", "x").permanent, Reply(250, "2.0.0", "x").temporary), (False, False))


class FailureTests(SynchronousTestCase):
    def test_failureForReply(self) -> None:
        """failure_for picks the failure class from the code and carries the Reply unchanged."""
        permanent = Reply(550, "5.7.1", "Relaying denied")
        temporary = Reply(451, "4.3.0", "Local error")
        self.assertIsInstance(failure_for(permanent), PermanentFailure)
        self.assertIsInstance(failure_for(temporary), TemporaryFailure)
        self.assertIs(failure_for(permanent).reply, permanent)
        self.assertEqual(str(failure_for(temporary)), "451 4.3.0 Local error")
