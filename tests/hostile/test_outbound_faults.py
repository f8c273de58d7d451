"""Outbound faults at unit level: stalled MX hosts and DNS failures (delivery/remote.py, queue/manager.py).

Complements tests/delivery/test_remote.py (connect timeouts, refused hosts,
SERVFAIL as a single answer): here a host that *accepts the connection and then
stalls* is timed out after ``relay.command_timeout`` (RFC 5321 section
4.5.3.2) and the next MX gets the mail; and DNS SERVFAIL / timeouts through the
queue manager defer for as long as the queue lifetime allows and never bounce.
Everything runs on a Clock over iosim; no sockets, no sleeps.
"""

from __future__ import annotations

import random

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.delivery.remote import RemoteAgent
from mailstack.delivery.replies import DNS_TEMPORARY
from mailstack.errors import TemporaryFailure
from mailstack.queue.manager import QueueManager
from tests.queue.outbound_fakes import (
    FakeAgent,
    FakeIntake,
    FakeMXResolver,
    FakeNet,
    FakeSMTPServer,
    FakeStore,
    FakeTLS,
    entry,
    make_config,
    run_blocking,
    two_mx,
)

START = 1_000_000.0
TIMEOUT = 60.0  # relay.command_timeout in these tests


class Silent(Protocol):
    """Accepts the TCP connection and never says anything (no greeting)."""


class StalledMXTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.net = FakeNet(self.clock)
        self.store = FakeStore(self.mktemp())
        self.config = make_config(command_timeout=f"{int(TIMEOUT)}s")
        self.agent = RemoteAgent(self.config, FakeMXResolver({"remote.test": two_mx()}), self.net, self.clock,
                                 self.store.message_path, run_blocking=run_blocking,
                                 tls_factory=lambda name: FakeTLS(name=name))

    def run_until_done(self, d, limit: float = 20 * TIMEOUT) -> float:
        """Pump the in-memory network and advance the clock a second at a time until ``d`` fires."""
        waited = 0.0
        while not d.called and waited < limit:
            self.net.drive(d)
            if d.called:
                break
            self.clock.advance(1)
            waited += 1
        return waited

    def deliver_with_primary(self, make_primary) -> tuple[dict, list, float]:
        self.net.servers[("192.0.2.1", 25)] = make_primary
        backup: list = []
        self.net.servers[("192.0.2.2", 25)] = lambda: backup.append(FakeSMTPServer()) or backup[-1]
        e = entry(self.store, "Q1", "s@here.test", ["a@remote.test"], arrival=START)
        d = self.agent.deliver(e, e.recipients)
        waited = self.run_until_done(d)
        return self.successResultOf(d), backup, waited

    def test_silentAfterConnectTimesOutThenBackup(self) -> None:
        """A primary that accepts TCP but never greets is abandoned after the command timeout
        (not sooner, not never) and the backup MX gets the message."""
        results, backup, waited = self.deliver_with_primary(Silent)
        self.assertEqual(results["a@remote.test"].code, 250)
        self.assertEqual(len(backup[0].messages), 1)
        self.assertGreaterEqual(waited, TIMEOUT - 1)
        self.assertLess(waited, 3 * TIMEOUT)

    def test_stallAtMailTimesOutThenBackup(self) -> None:
        """A primary that greets, answers EHLO and then stalls at MAIL FROM: timed out, backup gets it."""
        results, backup, waited = self.deliver_with_primary(lambda: FakeSMTPServer(hang_at=b"MAIL"))
        self.assertEqual(results["a@remote.test"].code, 250)
        self.assertEqual(len(backup[0].messages), 1)
        self.assertGreaterEqual(waited, TIMEOUT - 1)

    def test_stallAtRcptAndDataTimesOutThenBackup(self) -> None:
        """Stalls at RCPT and at DATA (before any content is sent) also move on to the backup."""
        for verb in (b"RCPT", b"DATA"):
            self.store.remove("Q1")
            results, backup, _ = self.deliver_with_primary(lambda v=verb: FakeSMTPServer(hang_at=v))
            self.assertEqual(results["a@remote.test"].code, 250, verb)
            self.assertEqual(len(backup[0].messages), 1, verb)

    def test_everyHostStallsIsTemporary(self) -> None:
        """When every MX stalls the result is a temporary failure (retry later), never a bounce."""
        self.net.servers[("192.0.2.1", 25)] = Silent
        self.net.servers[("192.0.2.2", 25)] = lambda: FakeSMTPServer(hang_at=b"MAIL")
        e = entry(self.store, "Q1", "s@here.test", ["a@remote.test"], arrival=START)
        d = self.agent.deliver(e, e.recipients)
        self.run_until_done(d)
        r = self.successResultOf(d)["a@remote.test"]
        self.assertTrue(r.temporary, r)


class DNSFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.net = FakeNet(self.clock)
        self.store = FakeStore(self.mktemp())
        self.resolver = FakeMXResolver({"remote.test": TemporaryFailure(DNS_TEMPORARY)})
        self.config = make_config(retry_intervals=["1m", "5m"], max_queue_lifetime="1d", delay_warning_after="")
        self.intake = FakeIntake()
        remote = RemoteAgent(self.config, self.resolver, self.net, self.clock, self.store.message_path,
                             run_blocking=run_blocking, tls_factory=lambda n: FakeTLS())
        self.manager = QueueManager(self.store, FakeAgent(), remote, self.clock, self.config, run_blocking,
                                    self.intake, rng=random.Random(0))
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for _ in range(50):
            if not any(p.pump() for p in list(self.net.pumps)):
                break

    def test_servfailDefersNeverBounces(self) -> None:
        """SERVFAIL/timeouts for most of a day: attempts on schedule, recipient still pending with a 4xx
        last reply, no DSN submitted, no connection made; once DNS answers, the mail is delivered."""
        entry(self.store, "Q1", "s@here.test", ["a@remote.test"], arrival=START)
        self.manager.kick("Q1")
        self.advance(0)
        for _ in range(12 * 20):  # 20 hours in 5-minute steps
            self.advance(300)
        rec = self.store.envelopes["Q1"]["recipients"][0]
        self.assertEqual(rec["status"], "pending")
        self.assertGreater(rec["attempts"], 100)
        self.assertTrue(rec["last_reply"].startswith("4"), rec["last_reply"])
        self.assertEqual(self.intake.messages, [], "a DSN was submitted for a DNS deferral")
        self.assertEqual(self.net.attempts, [])
        # DNS recovers: the next retry delivers.
        self.resolver.hosts["remote.test"] = two_mx()
        sinks: list = []
        self.net.servers[("192.0.2.1", 25)] = lambda: sinks.append(FakeSMTPServer()) or sinks[-1]
        for _ in range(3):
            self.advance(300)
        self.assertNotIn("Q1", self.store.envelopes)
        self.assertEqual(len(sinks[0].messages), 1)
        self.assertEqual(self.intake.messages, [])
