"""RemoteAgent: hosts in order, backup MX, classification, smarthost; and with the manager."""

from __future__ import annotations

import email
import random

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack.delivery import remote
from mailstack.delivery.remote import RemoteAgent, tcp_endpoint_factory
from mailstack.delivery.replies import DNS_TEMPORARY, NULL_MX, RemoteReply
from mailstack.errors import PermanentFailure, TemporaryFailure
from mailstack.interfaces import IDeliveryAgent, IMXResolver
from mailstack.mtasts import IMTASTS, Policy
from mailstack.mx import Host
from mailstack.queue.entry import QueueEntry, RecipientState
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


@implementer(IMTASTS)
class FakeMTASTS:
    """Policies by domain; None for the others."""

    def __init__(self, policies: dict) -> None:
        self.policies = policies

    def policy(self, domain: str) -> Deferred:
        return succeed(self.policies.get(domain))


class OutboundFixture:
    """A fake network, store and resolver (remote.test has two MXs), port 25."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.net = FakeNet(self.clock)
        self.store = FakeStore(self.mktemp())
        self.resolver = FakeMXResolver({"remote.test": two_mx()})
        self.config = make_config(port=25)


class RemoteAgentTests(OutboundFixture, SynchronousTestCase):
    def agent(self, **kw) -> RemoteAgent:
        kw.setdefault("tls_factory", lambda name: FakeTLS(name=name))
        kw.setdefault("verified_tls", lambda name: FakeTLS(name=name))
        kw.setdefault("run_blocking", run_blocking)
        return RemoteAgent(self.config, self.resolver, self.net, self.clock, self.store.message_path, **kw)

    def deliver(self, rcpts=("a@remote.test",), sender="s@here.test", agent=None):
        e = entry(self.store, "Q1", sender, list(rcpts), arrival=START)
        d = (agent or self.agent()).deliver(e, e.recipients)
        self.net.drive(d)
        return self.successResultOf(d)

    def sink(self, ip: str, **kw) -> list:
        servers: list = []

        def make():
            s = FakeSMTPServer(**kw)
            servers.append(s)
            return s

        self.net.servers[(ip, 25)] = make
        return servers

    def test_interface(self) -> None:
        """RemoteAgent provides IDeliveryAgent; the fake resolver provides IMXResolver."""
        verifyObject(IDeliveryAgent, self.agent())
        verifyObject(IMXResolver, self.resolver)

    def test_largeMessageReadOnlyInThreads(self) -> None:
        """A message relayed from its file is opened and read only inside
        run_blocking, chunk by chunk, never on the reactor thread."""
        in_thread = [False]
        reads: list[tuple[int, bool]] = []
        opened: list[bool] = []

        def threads(f, *a, **kw):
            in_thread[0] = True
            try:
                return maybeDeferred(f, *a, **kw)
            finally:
                in_thread[0] = False

        class Watched:
            def __init__(self, file) -> None:
                self.file = file

            def read(self, n: int) -> bytes:
                reads.append((n, in_thread[0]))
                return self.file.read(n)

            def close(self) -> None:
                self.file.close()

        real_open = remote._open_message

        def watched_open(path: str, size: int):
            opened.append(in_thread[0])
            file, size = real_open(path, size)
            return Watched(file), size

        self.patch(remote, "_open_message", watched_open)
        servers = self.sink("192.0.2.1")
        body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 300
        rcpt = RecipientState(address="a@remote.test", original="a@remote.test", local=False)
        e = self.store.add(QueueEntry(id="Q1", sender="s@here.test", arrival=START, recipients=[rcpt]), body)
        d = self.agent(run_blocking=threads).deliver(e, e.recipients)
        self.net.drive(d)
        self.assertEqual(self.successResultOf(d)["a@remote.test"].code, 250)
        self.assertEqual(servers[0].messages[0][2], body)
        self.assertEqual(opened, [True])
        self.assertGreater(len(reads), 4)  # 300 kB in 64 KiB chunks, plus the empty read at the end
        self.assertEqual([inside for _, inside in reads], [True] * len(reads))

    def test_primaryGetsIt(self) -> None:
        """The lowest-preference MX gets the mail; the reply says where it went."""
        primary = self.sink("192.0.2.1")
        backup = self.sink("192.0.2.2")
        results = self.deliver()
        reply = results["a@remote.test"]
        self.assertIsInstance(reply, RemoteReply)
        self.assertEqual((reply.code, reply.host, reply.ip), (250, "mx1.remote.test", "192.0.2.1"))
        self.assertEqual(len(primary[0].messages), 1)
        self.assertEqual(backup, [])

    def test_primaryRefusesBackupGetsIt(self) -> None:
        """A refused connection to the primary: the backup MX gets the mail."""
        backup = self.sink("192.0.2.2")
        results = self.deliver()
        self.assertEqual(self.net.attempts, [("192.0.2.1", 25), ("192.0.2.2", 25)])
        self.assertEqual(results["a@remote.test"].host, "mx2.remote.test")
        self.assertEqual(len(backup[0].messages), 1)

    def test_primaryTimesOut(self) -> None:
        """A connect timeout moves on to the backup too."""
        self.net.servers[("192.0.2.1", 25)] = "timeout"
        backup = self.sink("192.0.2.2")
        self.assertEqual(self.deliver()["a@remote.test"].code, 250)
        self.assertEqual(len(backup[0].messages), 1)

    def test_busyGreetingNextHost(self) -> None:
        """A 421 greeting, a refused EHLO or a 4xx MAIL at the primary: next host."""
        for kw in ({"greeting": b"421 4.3.2 busy"}, {"ehlo": b"421 4.3.2 busy"}, {"mail": b"451 4.3.0 later"}):
            self.net.servers.clear()
            self.sink("192.0.2.1", **kw)
            backup = self.sink("192.0.2.2")
            self.store.remove("Q1")
            self.assertEqual(self.deliver()["a@remote.test"].host, "mx2.remote.test", kw)
            self.assertEqual(len(backup[0].messages), 1)

    def test_allDownTemporary(self) -> None:
        """No host reachable: a temporary reply for every recipient."""
        results = self.deliver(rcpts=("a@remote.test", "b@remote.test"))
        for r in results.values():
            self.assertTrue(r.temporary, r)
            self.assertEqual(r.enhanced, "4.4.1")
        self.assertEqual(len(self.net.attempts), 2)

    def test_serverReplyPreferredOverRefusal(self) -> None:
        """Primary busy (421), backup refuses the connection: the recorded reply is the 421."""
        self.sink("192.0.2.1", greeting=b"421 4.3.2 Too busy")
        r = self.deliver()["a@remote.test"]
        self.assertEqual((r.code, r.enhanced, r.host), (421, "4.3.2", "mx1.remote.test"))

    def test_allGreetingsRefusedTemporary(self) -> None:
        """5xx greetings everywhere are retried later, not bounced."""
        self.sink("192.0.2.1", greeting=b"554 5.7.1 no")
        self.sink("192.0.2.2", greeting=b"554 5.7.1 no")
        self.assertTrue(self.deliver()["a@remote.test"].temporary)

    def test_senderRefusedEverywherePermanent(self) -> None:
        """MAIL FROM refused with 5xx by every host: permanent."""
        self.sink("192.0.2.1", mail=b"550 5.7.1 Sender blocked")
        self.sink("192.0.2.2", mail=b"550 5.7.1 Sender blocked")
        r = self.deliver()["a@remote.test"]
        self.assertEqual((r.code, r.enhanced), (550, "5.7.1"))

    def test_perRecipient(self) -> None:
        """5xx for one of two recipients; the other is delivered."""
        s = self.sink("192.0.2.1", rcpt={"bad@remote.test": b"550 5.1.1 No such user"})
        results = self.deliver(rcpts=("bad@remote.test", "good@remote.test"))
        self.assertEqual(results["bad@remote.test"].code, 550)
        self.assertEqual(results["good@remote.test"].code, 250)
        self.assertEqual(s[0].messages[0][1], [b"good@remote.test"])

    def test_dnsFailures(self) -> None:
        """Null MX / NXDOMAIN answer permanently, SERVFAIL temporarily."""
        self.resolver.hosts["null.test"] = PermanentFailure(NULL_MX)
        self.resolver.hosts["servfail.test"] = TemporaryFailure(DNS_TEMPORARY)
        r = self.deliver(rcpts=("a@null.test",))["a@null.test"]
        self.assertEqual((r.code, r.enhanced), (556, "5.1.10"))
        self.store.remove("Q1")
        r = self.deliver(rcpts=("a@servfail.test",))["a@servfail.test"]
        self.assertEqual(r.enhanced, "4.4.3")
        self.store.remove("Q1")
        r = self.deliver(rcpts=("a@nxdomain.test",))["a@nxdomain.test"]
        self.assertEqual(r.enhanced, "5.1.2")
        self.assertEqual(self.net.attempts, [])

    def test_everyAddressTried(self) -> None:
        """Each address of a host is tried before the next host."""
        self.resolver.hosts["remote.test"] = [
            Host("mx1.remote.test", ("192.0.2.1", "2001:db8::1"), 10),
            Host("mx2.remote.test", ("192.0.2.2",), 20),
        ]
        self.deliver()
        self.assertEqual([a[0] for a in self.net.attempts], ["192.0.2.1", "2001:db8::1", "192.0.2.2"])

    def test_sourceAddressFamily(self) -> None:
        """With relay.source_address set, addresses of the other family are skipped."""
        self.config = make_config(source_address="127.0.0.1")
        self.resolver.hosts["remote.test"] = [Host("mx1.remote.test", ("2001:db8::1", "192.0.2.1"), 10)]
        self.sink("192.0.2.1")
        self.assertEqual(self.deliver()["a@remote.test"].code, 250)
        self.assertEqual(self.net.attempts, [("192.0.2.1", 25)])

    def test_tlsFailureFallsBackToPlaintext(self) -> None:
        """Opportunistic STARTTLS that fails to negotiate is retried without TLS."""
        s = self.sink("192.0.2.1", starttls=FakeTLS(ok=False))
        self.assertEqual(self.deliver()["a@remote.test"].code, 250)
        self.assertEqual(len(s), 2)
        self.assertNotIn(b"STARTTLS", s[1].commands)
        self.assertEqual(len(s[1].messages), 1)

    def test_tlsFailureWithVerifyNoPlaintext(self) -> None:
        """With relay.tls_verify TLS is mandatory: no plaintext retry, no server without STARTTLS."""
        self.config = make_config(tls_verify=True)
        s = self.sink("192.0.2.1", starttls=FakeTLS(ok=False))
        plain = self.sink("192.0.2.2")
        r = self.deliver()["a@remote.test"]
        self.assertTrue(r.temporary)
        self.assertEqual(len(s), 1)
        self.assertEqual(plain[0].messages, [])
        self.net.servers[("192.0.2.2", 25)] = lambda: FakeSMTPServer(starttls=FakeTLS())
        self.store.remove("Q1")
        self.assertEqual(self.deliver()["a@remote.test"].host, "mx2.remote.test")

    def test_starttlsUsed(self) -> None:
        """STARTTLS is used when offered, with the MX host name for the TLS context."""
        names = []
        s = self.sink("192.0.2.1", starttls=FakeTLS())
        agent = self.agent(tls_factory=lambda name: names.append(name) or FakeTLS())
        self.assertEqual(self.deliver(agent=agent)["a@remote.test"].code, 250)
        self.assertTrue(s[0].tls)
        self.assertEqual(names, ["mx1.remote.test"])

    def test_lostAfterDotNoSecondHost(self) -> None:
        """A connection lost after the data went out is retried later, not at the backup."""
        self.sink("192.0.2.1", drop_at=b".")
        backup = self.sink("192.0.2.2")
        r = self.deliver()["a@remote.test"]
        self.assertTrue(r.temporary)
        self.assertEqual(backup, [])

    def test_smarthost(self) -> None:
        """A smarthost replaces MX: its port, STARTTLS required, AUTH PLAIN."""
        self.config = make_config(smarthost="relay.provider.test:2587", smarthost_user="u")
        self.resolver.names["relay.provider.test"] = ["198.51.100.7"]
        servers: list = []
        self.net.servers[("198.51.100.7", 2587)] = lambda: (
            servers.append(FakeSMTPServer(starttls=FakeTLS(), auth=("u", "pw"))) or servers[-1]
        )
        r = self.deliver(agent=self.agent(smarthost_password="pw"))["a@remote.test"]
        self.assertEqual(r.code, 250)
        self.assertEqual(servers[0].commands[1], b"STARTTLS")
        self.assertTrue(any(c.startswith(b"AUTH PLAIN") for c in servers[0].commands))
        self.assertEqual(len(servers[0].messages), 1)

    def test_smarthostAuthFailureTemporary(self) -> None:
        """Authentication refused by the smarthost is temporary (no bounce)."""
        self.config = make_config(smarthost="198.51.100.7:2587", smarthost_user="u")
        self.net.servers[("198.51.100.7", 2587)] = lambda: FakeSMTPServer(starttls=FakeTLS(), auth=("u", "pw"))
        r = self.deliver(agent=self.agent(smarthost_password="wrong"))["a@remote.test"]
        self.assertEqual((r.code, r.enhanced), (451, "4.7.0"))

    def test_smarthostWithoutTLSPlaintextWithoutCredentials(self) -> None:
        """A smarthost without STARTTLS (a LAN relay, a test sink) gets the mail in
        plain text when no AUTH is configured: TLS to it is opportunistic."""
        self.config = make_config(smarthost="198.51.100.7:2587")
        servers: list = []
        self.net.servers[("198.51.100.7", 2587)] = lambda: servers.append(FakeSMTPServer()) or servers[-1]
        r = self.deliver()["a@remote.test"]
        self.assertEqual(r.code, 250)
        self.assertEqual(len(servers[0].messages), 1)

    def test_smarthostWithCredentialsWithoutTLSRefused(self) -> None:
        """With relay.smarthost_user, a smarthost that does not offer STARTTLS gets
        neither AUTH nor the mail; the recipient stays queued with 4.7.4."""
        self.config = make_config(smarthost="198.51.100.7:2587", smarthost_user="u")
        servers: list = []
        self.net.servers[("198.51.100.7", 2587)] = lambda: (
            servers.append(FakeSMTPServer(auth=("u", "pw"))) or servers[-1]
        )
        r = self.deliver(agent=self.agent(smarthost_password="pw"))["a@remote.test"]
        self.assertEqual((r.code, r.enhanced), (451, "4.7.4"))
        self.assertFalse(any(c.startswith(b"AUTH") for s in servers for c in s.commands))
        self.assertEqual(servers[0].messages, [])

    def test_smarthostCredentialsOnlyOverVerifiedTLS(self) -> None:
        """With relay.smarthost_user the STARTTLS context is the verified one, for the
        smarthost's name; a failed (unverified) handshake sends no AUTH, is not retried
        in plain text, and leaves the recipient queued with 4.7.5."""
        self.config = make_config(smarthost="relay.provider.test:2587", smarthost_user="u")
        self.resolver.names["relay.provider.test"] = ["198.51.100.7"]
        servers: list = []
        self.net.servers[("198.51.100.7", 2587)] = lambda: (
            servers.append(FakeSMTPServer(starttls=FakeTLS(ok=False), auth=("u", "pw"))) or servers[-1]
        )
        verified: list = []
        opportunistic: list = []
        agent = self.agent(
            smarthost_password="pw",
            verified_tls=lambda name: verified.append(name) or FakeTLS(name=name),
            tls_factory=lambda name: opportunistic.append(name) or FakeTLS(name=name),
        )
        r = self.deliver(agent=agent)["a@remote.test"]
        self.assertEqual((r.code, r.enhanced), (451, "4.7.5"))
        self.assertEqual(verified, ["relay.provider.test"])
        self.assertEqual(opportunistic, [])
        self.assertEqual(len(servers), 1)  # no plaintext retry
        self.assertFalse(any(c.startswith(b"AUTH") for c in servers[0].commands))

    def test_ownAddressIsLoop(self) -> None:
        """The best MX host resolves to one of our own SMTP listening addresses (on the
        relay port): a loop, 554 5.4.6 "loops back to myself", and no connection at all
        (hosts after ourselves are not tried, RFC 5321 5.1)."""
        ours, backup = self.sink("192.0.2.1"), self.sink("192.0.2.2")
        agent = self.agent(own_addresses={25: ("192.0.2.1",)})
        r = self.deliver(agent=agent)["a@remote.test"]
        self.assertEqual((r.code, r.enhanced), (554, "5.4.6"))
        self.assertIn("loops back to myself", r.text)
        self.assertEqual((ours, backup), ([], []))

    def test_ownAddressAsBackupMX(self) -> None:
        """We are the backup MX (by address): the primary is tried, never our own address."""
        primary = self.sink("192.0.2.1", mail=b"451 4.3.0 busy")
        own = self.sink("192.0.2.2")
        r = self.deliver(agent=self.agent(own_addresses={25: ("192.0.2.2",)}))["a@remote.test"]
        self.assertEqual((r.code, r.host), (451, "mx1.remote.test"))
        self.assertEqual(len(primary), 1)
        self.assertEqual(own, [])

    def test_ownAddressesOfConfig(self) -> None:
        """own_addresses: the interface of each SMTP listener by port; a wildcard
        listener adds the host's interface addresses."""
        from mailstack import config as configmod
        from mailstack.delivery.ownaddr import own_addresses

        cfg = configmod.from_mapping(
            {
                "listen": {
                    "smtp": ["tcp:25:interface=192.0.2.9", "tcp:2525"],
                    "submission": ["tcp:587:interface=\\:\\:1"],
                    "submissions": [],
                }
            }
        )
        got = own_addresses(cfg, interfaces=["198.51.100.4", "2001:db8::4"])
        self.assertEqual(got[25], ("192.0.2.9",))
        self.assertEqual(got[587], ("::1",))
        self.assertEqual(set(got[2525]), {"0.0.0.0", "198.51.100.4", "2001:db8::4"})

    def test_ownAddressOtherPortNoLoop(self) -> None:
        """Our address on another port than relay.port is somebody else's server: delivered."""
        self.sink("192.0.2.1")
        r = self.deliver(agent=self.agent(own_addresses={2525: ("192.0.2.1",)}))["a@remote.test"]
        self.assertEqual(r.code, 250)

    def test_replyTextEscapedInLogs(self) -> None:
        """A remote reply with control characters reaches the log escaped (logsafe)."""
        self.sink("192.0.2.1", mail=b"451 4.3.0 evil\x1b[31m\rINJECTED")
        self.sink("192.0.2.2", mail=b"451 4.3.0 evil\x1b[31m\rINJECTED")
        seen: list = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        self.deliver()
        texts = [str(e.get("reply", "")) for e in seen if "reply" in e]
        self.assertTrue(texts)
        self.assertFalse(any("\x1b" in t or "\r" in t for t in texts))
        self.assertTrue(any("\\x1b" in t for t in texts))

    def sts_agent(self, mode: str, mx: tuple, **kw) -> RemoteAgent:
        sts = FakeMTASTS({"remote.test": Policy(mode, mx, 86400, id="1", fetched=START)})
        verifyObject(IMTASTS, sts)
        return self.agent(mta_sts=sts, **kw)

    def test_mtaStsEnforceOnlyMatchingMXVerified(self) -> None:
        """MTA-STS enforce: only MX hosts matching the policy are tried, with the
        verified TLS context for the MX name (RFC 8461 section 5)."""
        primary = self.sink("192.0.2.1", starttls=FakeTLS())
        backup = self.sink("192.0.2.2", starttls=FakeTLS())
        verified: list = []
        agent = self.sts_agent(
            "enforce", ("mx2.remote.test",), verified_tls=lambda name: verified.append(name) or FakeTLS(name=name)
        )
        r = self.deliver(agent=agent)["a@remote.test"]
        self.assertEqual((r.code, r.host), (250, "mx2.remote.test"))
        self.assertEqual(primary, [])
        self.assertTrue(backup[0].tls)
        self.assertEqual(verified, ["mx2.remote.test"])

    def test_mtaStsEnforceNoMatchingMXDeferred(self) -> None:
        """MTA-STS enforce with no MX host matching: no connection, 451 4.7.5 naming the policy."""
        primary = self.sink("192.0.2.1", starttls=FakeTLS())
        r = self.deliver(agent=self.sts_agent("enforce", ("mail.elsewhere.test",)))["a@remote.test"]
        self.assertEqual((r.code, r.enhanced), (451, "4.7.5"))
        self.assertIn("MTA-STS", r.text)
        self.assertEqual(primary, [])

    def test_mtaStsEnforceWithoutTLSDeferred(self) -> None:
        """MTA-STS enforce: an MX host without STARTTLS or whose certificate fails
        gets nothing, and there is no plaintext retry; the recipient stays deferred."""
        plain = self.sink("192.0.2.1")
        bad = self.sink("192.0.2.2", starttls=FakeTLS(ok=False))
        r = self.deliver(agent=self.sts_agent("enforce", ("*.remote.test",)))["a@remote.test"]
        self.assertTrue(r.temporary)
        self.assertEqual(r.enhanced[:3], "4.7")
        self.assertEqual(plain[0].messages, [])
        self.assertEqual(len(bad), 1)
        self.assertEqual(bad[0].messages, [])

    def test_mtaStsTestingDelivers(self) -> None:
        """MTA-STS testing: a mismatching MX still gets the mail (only logged)."""
        primary = self.sink("192.0.2.1")
        r = self.deliver(agent=self.sts_agent("testing", ("mail.elsewhere.test",)))["a@remote.test"]
        self.assertEqual(r.code, 250)
        self.assertEqual(len(primary[0].messages), 1)

    def test_connectionReused(self) -> None:
        """A second message to the same address reuses the idle session (one EHLO)."""
        servers = self.sink("192.0.2.1")
        agent = self.agent()
        for qid in ("Q1", "Q2"):
            e = entry(self.store, qid, "s@here.test", ["a@remote.test"], arrival=START)
            d = agent.deliver(e, e.recipients)
            self.net.drive(d)
            self.assertEqual(self.successResultOf(d)["a@remote.test"].code, 250)
        self.assertEqual(len(self.net.attempts), 1)
        self.assertEqual(len(servers[0].messages), 2)
        self.assertEqual(servers[0].commands.count(b"EHLO mx.test"), 1)
        self.assertNotIn(b"QUIT", servers[0].commands)
        self.clock.advance(remote.IDLE_TIME)
        self.net.drive(Deferred())
        self.assertEqual(servers[0].commands[-1], b"QUIT")

    def start(self, agent: RemoteAgent, qid: str) -> Deferred:
        e = entry(self.store, qid, "s@here.test", ["a@remote.test"], arrival=START)
        return agent.deliver(e, e.recipients)

    def test_rideBehindBusyConnection(self) -> None:
        """A message for an address whose pipelining connection is busy goes out on
        it behind the other message's data, rather than on a second connection."""
        servers = self.sink("192.0.2.1")
        agent = self.agent()
        self.net.drive(self.start(agent, "Q1"))
        d2, d3 = self.start(agent, "Q2"), self.start(agent, "Q3")
        self.net.drive(d3)
        self.net.drive(d2)
        self.assertEqual([self.successResultOf(d)["a@remote.test"].code for d in (d2, d3)], [250, 250])
        self.assertEqual(len(self.net.attempts), 1)
        self.assertEqual(len(servers[0].messages), 3)

    def test_noRideBehindSlowServer(self) -> None:
        """A server that took long to answer the last message's data gets the next
        message on another connection, in parallel, not behind the busy one."""
        clock = self.clock

        class SlowData(FakeSMTPServer):
            """Answers the end of the data a second later, reading nothing meanwhile."""

            def lineReceived(self, line: bytes) -> None:
                if self._data is not None and line == b".":
                    self.pauseProducing()
                    clock.callLater(1.0, self.answer, line)
                else:
                    super().lineReceived(line)

            def answer(self, line: bytes) -> None:
                super().lineReceived(line)
                self.resumeProducing()

        servers: list = []
        self.net.servers[("192.0.2.1", 25)] = lambda: servers.append(SlowData()) or servers[-1]
        agent = self.agent()

        def finish(*ds: Deferred) -> None:
            for d in ds:
                self.net.drive(d)
            while not all(d.called for d in ds):
                clock.advance(1.0)
                for d in ds:
                    self.net.drive(d)

        d1 = self.start(agent, "Q1")
        finish(d1)
        self.assertEqual(self.successResultOf(d1)["a@remote.test"].code, 250)
        d2, d3 = self.start(agent, "Q2"), self.start(agent, "Q3")
        finish(d2, d3)
        self.assertEqual([self.successResultOf(d)["a@remote.test"].code for d in (d2, d3)], [250, 250])
        self.assertEqual(len(self.net.attempts), 2)
        self.assertEqual([len(s.messages) for s in servers], [2, 1])

    def test_riderReconnectsWhenConnectionDies(self) -> None:
        """The connection dies after the first message's data: that one is deferred
        (the remote may have it), the one behind it goes out on a new connection."""

        class DropSecond(FakeSMTPServer):
            """No reply to the second message's "."; drops once the rider's DATA came."""

            dropping = False

            def lineReceived(self, line: bytes) -> None:
                if self._data is not None and line == b"." and len(self.messages) == 1:
                    self._data, self.dropping = None, True
                elif self.dropping:
                    self.commands.append(line)
                    if line == b"DATA":
                        self.transport.loseConnection()
                else:
                    super().lineReceived(line)

        servers: list = []
        self.net.servers[("192.0.2.1", 25)] = lambda: (
            servers.append((DropSecond if not servers else FakeSMTPServer)()) or servers[-1]
        )
        agent = self.agent()
        self.net.drive(self.start(agent, "Q1"))
        d2, d3 = self.start(agent, "Q2"), self.start(agent, "Q3")
        self.net.drive(d2)
        self.net.drive(d3)
        self.assertTrue(self.successResultOf(d2)["a@remote.test"].temporary)
        self.assertEqual(self.successResultOf(d3)["a@remote.test"].code, 250)
        self.assertEqual(len(self.net.attempts), 2)
        self.assertEqual([c[:4] for c in servers[0].commands].count(b"MAIL"), 3)  # Q3's rode behind Q2's data
        self.assertEqual(len(servers[1].messages), 1)

    def test_idleTimerPerConnection(self) -> None:
        """Reusing a connection moves its one idle timer instead of making a new one
        per message; it says QUIT IDLE_TIME after the last message."""
        servers = self.sink("192.0.2.1")
        agent = self.agent()
        idle_timers = []
        call_later = self.clock.callLater
        self.clock.callLater = lambda delay, *a, **kw: (
            (  # type: ignore[method-assign]
                idle_timers.append(delay) if delay == remote.IDLE_TIME else None
            )
            or call_later(delay, *a, **kw)
        )
        for qid in ("Q1", "Q2", "Q3"):
            self.net.drive(self.start(agent, qid))
            self.clock.advance(remote.IDLE_TIME / 2)
        self.assertEqual(idle_timers, [remote.IDLE_TIME])
        self.assertNotIn(b"QUIT", servers[0].commands)
        self.clock.advance(remote.IDLE_TIME / 2)
        self.net.drive(Deferred())
        self.assertEqual(servers[0].commands[-1], b"QUIT")

    def test_staleIdleConnection(self) -> None:
        """An idle session the server closed is replaced by a new connection."""
        servers = self.sink("192.0.2.1")
        agent = self.agent()
        e = entry(self.store, "Q1", "s@here.test", ["a@remote.test"], arrival=START)
        d = agent.deliver(e, e.recipients)
        self.net.drive(d)
        servers[0].transport.loseConnection()
        self.net.pumps[0].flush()
        e = entry(self.store, "Q2", "s@here.test", ["a@remote.test"], arrival=START)
        d = agent.deliver(e, e.recipients)
        self.net.drive(d)
        self.assertEqual(self.successResultOf(d)["a@remote.test"].code, 250)
        self.assertEqual(len(self.net.attempts), 2)
        self.assertEqual(len(servers[1].messages), 1)

    def test_closeIdle(self) -> None:
        """close_idle() says QUIT on idle sessions and stops reuse."""
        servers = self.sink("192.0.2.1")
        agent = self.agent()
        self.deliver(agent=agent)
        agent.close_idle()
        self.net.drive(Deferred())
        self.assertEqual(servers[0].commands[-1], b"QUIT")
        self.store.remove("Q1")
        self.deliver(agent=agent)
        self.net.drive(Deferred())
        self.assertEqual(len(self.net.attempts), 2)
        self.assertEqual(servers[1].commands[-1], b"QUIT")

    def test_abortAllDropsAttemptsInProgress(self) -> None:
        """abort_all() (shutdown after the grace period) drops a connection in the
        middle of a transaction: its recipients get a temporary reply and no
        other MX is tried."""
        self.sink("192.0.2.1", hang_at=b"DATA")
        self.sink("192.0.2.2")
        agent = self.agent()
        e = entry(self.store, "Q1", "s@here.test", ["a@remote.test"], arrival=START)
        d = agent.deliver(e, e.recipients)
        self.net.drive(d)
        self.assertNoResult(d)
        agent.abort_all()
        self.net.drive(d)
        reply = self.successResultOf(d)["a@remote.test"]
        self.assertTrue(reply.temporary, str(reply))
        self.assertEqual(self.net.attempts, [("192.0.2.1", 25)])
        self.assertTrue(self.net.pumps[0].clientIO.disconnected)

    def test_tcpEndpointFactory(self) -> None:
        """Production endpoints: TCP4/TCP6 with the connect timeout and source address."""
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        config = make_config(connect_timeout="7s", source_address="127.0.0.9")
        ep = tcp_endpoint_factory(reactor, config)("192.0.2.1", 2525)
        ep.connect(__import__("twisted.internet.protocol", fromlist=["Factory"]).Factory())
        host, port, _, timeout, bind = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout, bind), ("192.0.2.1", 2525, 7, ("127.0.0.9", 0)))


class OutboundTests(SynchronousTestCase):
    """The manager with the real RemoteAgent over the in-memory network."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.net = FakeNet(self.clock)
        self.store = FakeStore(self.mktemp())
        self.resolver = FakeMXResolver({"remote.test": two_mx()})
        self.config = make_config(retry_intervals=["1m", "5m"], max_queue_lifetime="1h", delay_warning_after="")
        self.intake = FakeIntake()
        remote = RemoteAgent(
            self.config,
            self.resolver,
            self.net,
            self.clock,
            self.store.message_path,
            run_blocking=run_blocking,
            tls_factory=lambda n: FakeTLS(),
            verified_tls=lambda n: FakeTLS(),
        )
        self.manager = QueueManager(
            self.store,
            FakeAgent(),
            remote,
            self.clock,
            self.config,
            run_blocking,
            self.intake,
            rng=random.Random(0),
        )
        self.manager.startService()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for _ in range(50):
            if not any(p.pump() for p in list(self.net.pumps)):
                break

    def test_allDownThenPrimaryReturns(self) -> None:
        """All MX down: deferred, retried on schedule, delivered once the primary is back."""
        entry(self.store, "Q1", "s@here.test", ["a@remote.test"], arrival=START)
        self.manager.kick("Q1")
        self.advance(0)
        self.assertEqual(len(self.net.attempts), 2)
        rec = self.store.envelopes["Q1"]["recipients"][0]
        self.assertEqual((rec["status"], rec["attempts"]), ("pending", 1))
        self.advance(70)
        self.assertEqual(len(self.net.attempts), 4)
        servers: list = []
        self.net.servers[("192.0.2.1", 25)] = lambda: servers.append(FakeSMTPServer()) or servers[-1]
        self.advance(200)
        self.assertEqual(len(self.net.attempts), 4, "not before the 5 minute interval")
        self.advance(150)
        self.assertEqual(len(servers[0].messages), 1)
        self.assertNotIn("Q1", self.store.envelopes)

    def test_permanentBounceAndExpiry(self) -> None:
        """A 5xx recipient bounces at once; a deferred one bounces at expiry; one DSN each time."""
        self.net.servers[("192.0.2.1", 25)] = lambda: FakeSMTPServer(
            rcpt={"bad@remote.test": b"550 5.1.1 No such user", "slow@remote.test": b"450 4.2.1 Mailbox busy"}
        )
        entry(self.store, "Q1", "s@here.test", ["bad@remote.test", "slow@remote.test", "ok@remote.test"], arrival=START)
        self.manager.kick("Q1")
        self.advance(0)
        self.assertEqual(len(self.intake.messages), 1)
        msg = email.message_from_bytes(self.intake.messages[0][1])
        report = msg.get_payload()[1].get_payload()
        self.assertEqual([p["Final-Recipient"] for p in report[1:]], ["rfc822; bad@remote.test"])
        self.assertEqual(report[1]["Remote-MTA"], "dns; mx1.remote.test")
        self.assertEqual(report[1]["Diagnostic-Code"], "smtp; 550 5.1.1 No such user")
        for _ in range(20):
            self.advance(300)
        self.assertEqual(len(self.intake.messages), 2)
        report = email.message_from_bytes(self.intake.messages[1][1]).get_payload()[1].get_payload()
        self.assertEqual([p["Final-Recipient"] for p in report[1:]], ["rfc822; slow@remote.test"])
        self.assertEqual(report[1]["Action"], "failed")
        self.assertNotIn("Q1", self.store.envelopes)


class MessageBytesTests(OutboundFixture, SynchronousTestCase):
    """The manager reads small messages in its thread call and hands the bytes over."""

    def test_agentRelaysBytes(self) -> None:
        """deliver(..., message=bytes) relays those bytes and opens no file."""
        servers: list = []
        self.net.servers[("192.0.2.1", 25)] = lambda: servers.append(FakeSMTPServer()) or servers[-1]
        agent = RemoteAgent(
            self.config,
            self.resolver,
            self.net,
            self.clock,
            lambda qid: "/nonexistent/" + qid,
            run_blocking=run_blocking,
            tls_factory=lambda n: FakeTLS(),
            verified_tls=lambda n: FakeTLS(),
        )
        e = entry(self.store, "Q1", "s@here.test", ["a@remote.test"], arrival=START)
        d = agent.deliver(e, e.recipients, message=b"Subject: mem\r\n\r\n.dot\r\n")
        self.net.drive(d)
        self.assertEqual(self.successResultOf(d)["a@remote.test"].code, 250)
        self.assertEqual(servers[0].messages[0][2], b"Subject: mem\r\n\r\n..dot\r\n")

    def test_managerHandsOverSmallMessages(self) -> None:
        """A message up to PRELOAD_MAX goes to an agent with ``takes_message`` as bytes;
        a larger one (or an agent without it) is opened by the agent."""
        from mailstack.queue import manager as manager_mod

        seen: list = []

        class Agent(FakeAgent):
            takes_message = True

            def deliver(self, e, rcpts, message=None):
                seen.append(message)
                return super().deliver(e, rcpts)

        body = b"Subject: hi\r\n\r\nbody\r\n"
        agent = Agent()
        m = QueueManager(
            self.store, FakeAgent(), agent, self.clock, self.config, run_blocking, FakeIntake(), rng=random.Random(0)
        )
        m.startService()
        self.addCleanup(m.stopService)
        e = entry(self.store, "Q1", "s@here.test", ["a@remote.test"], arrival=START)
        e.size = len(body)
        self.store.save(e)
        m.kick("Q1")
        self.patch(manager_mod, "PRELOAD_MAX", 4)
        e2 = entry(self.store, "Q2", "s@here.test", ["a@remote.test"], arrival=START)
        e2.size = len(body)
        self.store.save(e2)
        m.kick("Q2")
        self.assertEqual(seen, [b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n", None])
