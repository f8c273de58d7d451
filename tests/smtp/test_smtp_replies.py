"""Tests for mailstack.smtp.replies: one table, RFC 3463 codes that match."""

import errno

from twisted.trial.unittest import SynchronousTestCase

from mailstack import config
from mailstack.address import parse_address
from mailstack.errors import PermanentFailure, Reply
from mailstack.intake import reply_for
from mailstack.routing import Router
from mailstack.smtp import replies as R
from tests.test_routing import Aliases, Users

CONFIG = config.from_mapping({})


class RepliesTests(SynchronousTestCase):
    def test_classDigitsMatch(self) -> None:
        """Every constant's enhanced code has the class digit of its reply code (RFC 3463 section 2)."""
        self.assertGreater(len(R.ALL), 40)
        for name, reply in R.ALL.items():
            if reply.enhanced:
                self.assertEqual(reply.enhanced[0], str(reply.code)[0], name)
                self.assertRegex(reply.enhanced, r"^[245]\.\d{1,3}\.\d{1,3}$", name)

    def test_enhancedEverywhereButGreetingAndData(self) -> None:
        """Only the 354 intermediate reply lacks an enhanced code (RFC 2034 section 3)."""
        missing = [n for n, r in R.ALL.items() if not r.enhanced]
        self.assertEqual(missing, ["START_DATA"])

    def test_documentedCodes(self) -> None:
        """The codes README documents for the submission rules, rate and size limits."""
        self.assertEqual(str(R.TLS_REQUIRED)[:9], "530 5.7.0")
        self.assertEqual(str(R.AUTH_REQUIRED)[:9], "530 5.7.0")
        self.assertEqual(str(R.SENDER_NOT_OWNED)[:9], "553 5.7.1")
        self.assertEqual(str(R.AUTH_FAILED)[:9], "535 5.7.8")
        self.assertEqual(str(R.TOO_MANY_RECIPIENTS)[:9], "452 4.5.3")
        self.assertEqual(str(R.MESSAGE_TOO_BIG)[:9], "552 5.3.4")

    def test_rcptRefusalsComeFromTheTable(self) -> None:
        """What the router makes the server answer at RCPT: 550 5.7.1 for a relay attempt, 550 5.1.1
        for an unknown local user, 550 5.4.6 for an alias loop, all constants of this table."""
        r = Router(CONFIG, Users(["alice@localhost"]), Aliases({"loop@localhost": ["loop@localhost"]}))
        cases = [
            ("user@remote.example", R.RELAY_DENIED, "550 5.7.1"),
            ("nobody@localhost", R.UNKNOWN_USER, "550 5.1.1"),
            ("loop@localhost", R.ALIAS_LOOP, "550 5.4.6"),
        ]
        for address, reply, code in cases:
            failure = self.assertRaises(PermanentFailure, r.resolve, parse_address(address), False)
            self.assertIs(failure.reply, reply, address)
            self.assertEqual(str(failure.reply)[:9], code, address)

    def test_commitFailuresComeFromTheTable(self) -> None:
        """What the intake makes the server answer after DATA when the commit fails: 452 4.3.1 on a
        full disk, 451 4.3.0 otherwise."""
        self.assertIs(reply_for(OSError(errno.ENOSPC, "No space left on device")), R.DISK_FULL)
        self.assertIs(reply_for(OSError(errno.EIO, "Input/output error")), R.LOCAL_ERROR)
        self.assertEqual(str(R.DISK_FULL)[:9], "452 4.3.1")
        self.assertEqual(str(R.LOCAL_ERROR)[:9], "451 4.3.0")

    def test_ehloMultiline(self) -> None:
        """EHLO is multi-line with '-' continuations and no enhanced codes (RFC 5321 4.2.1)."""
        wire = R.ehlo("mx.example.org", "c", ["PIPELINING", "8BITMIME"]).encode()
        self.assertEqual(wire, b"250-mx.example.org Hello c\r\n250-PIPELINING\r\n250 8BITMIME\r\n")

    def test_ehloWireRemembered(self) -> None:
        """ehlo_wire is the encoded EHLO reply, built once per (host, client, keywords) and then reused."""
        kw = ("PIPELINING", "8BITMIME")
        first = R.ehlo_wire("mx.example.org", "c", kw)
        self.assertEqual(first, R.ehlo("mx.example.org", "c", list(kw)).encode())
        self.assertIs(R.ehlo_wire("mx.example.org", "c", kw), first)
        self.assertEqual(
            R.ehlo_wire("mx.example.org", "d", kw), b"250-mx.example.org Hello d\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        )

    def test_banner(self) -> None:
        """The greeting names the host: 220 <hostname> ESMTP mailstack."""
        self.assertEqual(R.banner("mx.example.org").encode(), b"220 mx.example.org ESMTP mailstack\r\n")

    def test_queued(self) -> None:
        """The DATA success reply carries the queue id."""
        self.assertEqual(R.queued("ABC").encode(), b"250 2.0.0 Ok: queued as ABC\r\n")
        self.assertIsInstance(R.queued("x"), Reply)
