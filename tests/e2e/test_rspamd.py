"""End to end: a private rspamd (tests/e2e/rspamd.py) answers GTUBE with reject,
seen through mailstack's own rspamd client."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mailstack.inbound.rspamd import REFUSE, Envelope, RspamdClient
from tests.e2e import rspamd as rspamd_proc

MESSAGE = (
    "From: Alice <alice@example.org>\r\n"
    "To: bob@example.net\r\n"
    "Subject: test\r\n"
    "Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    "Message-ID: <gtube@example.org>\r\n"
    "\r\n"
    f"{rspamd_proc.GTUBE}\r\n"
).encode()


class RspamdGTUBETests(TestCase):
    timeout = 180  # rspamd compiles its rules at start-up

    def setUp(self):
        if not rspamd_proc.available():
            raise SkipTest("rspamd is not installed (Debian package rspamd)")
        self.rspamd = rspamd_proc.Rspamd(self.mktemp())
        self.addCleanup(self.rspamd.stop)
        self.rspamd.start()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    async def test_gtube_rejected(self) -> None:
        """/checkv2 with the GTUBE string answers action reject, which the client maps to refuse."""
        client = RspamdClient(self.rspamd.url, Agent(reactor, pool=self.pool), reactor, deferToThread, timeout=60)
        envelope = Envelope("alice@example.org", ["bob@example.net"], "192.0.2.1", "client.example", "mx.test")
        verdict = await client.scan(MESSAGE, envelope)
        self.assertEqual((verdict.action, verdict.decision), ("reject", REFUSE), self.rspamd.diagnostics())
        self.assertIn("GTUBE", verdict.symbols)
