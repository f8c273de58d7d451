"""Tests for mailstack.lognoise: the resolver's UDP port lines are dropped, nothing else."""

from __future__ import annotations

from twisted.internet import task
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.names import client
from twisted.python import log as legacy
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailstack import lognoise
from tests.support.dnsserver import listen


class QuietTests(TestCase):
    def setUp(self) -> None:
        self.seen: list[dict] = []
        self.observer = lognoise.quiet(self.seen.append)

    def test_isAnObserver(self) -> None:
        """The filtered observer is an ILogObserver like the one it wraps."""
        verifyObject(ILogObserver, self.observer)

    def test_otherLinesPass(self) -> None:
        """Our own lines, other legacy lines and other ports' lines are kept."""
        publisher = LogPublisher(self.observer)
        Logger(observer=publisher).info("accepted {queue_id}", queue_id="q1")
        for text in ("SMTPFactory starting on 25", "(TCP Port 25 Closed)", "Starting protocol <x.Y object at 0x1>",
                     "DNSDatagramProtocol starting on 53 and more"):
            publisher({"log_namespace": "log_legacy", "log_text": text, "log_format": "{log_text}"})
        self.assertEqual(len(self.seen), 5)

    def test_realResolverQueryLeavesNoLine(self) -> None:
        """A twisted.names query through a fresh UDP port logs nothing once filtered,
        where unfiltered it logs the port's and the protocol's start and stop."""
        from twisted.internet import reactor

        everything: list[dict] = []
        kept: list[dict] = []
        quiet = lognoise.quiet(kept.append)

        def both(event: dict) -> None:
            everything.append(event)
            quiet(event)

        legacy.addObserver(both)
        self.addCleanup(legacy.removeObserver, both)
        port, listening = listen(reactor, {"a.test": [("TXT", "hello")]})
        for p in listening:
            self.addCleanup(p.stopListening)
        resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        d = resolver.lookupText("a.test")
        d.addCallback(lambda answer: self.assertEqual(answer[0][0].payload.data, [b"hello"]))
        # The port closes in a later turn than the answer.
        d.addCallback(lambda _: task.deferLater(reactor, 0.01, lambda: None))

        def check(_: object) -> None:
            texts = [e.get("log_text", "") for e in everything]
            self.assertTrue(any("DNSDatagramProtocol starting on" in t for t in texts), texts)
            self.assertTrue(any(t.startswith("(UDP Port") for t in texts), texts)
            self.assertEqual([e for e in kept if "DNSDatagramProtocol" in e.get("log_text", "")
                              or e.get("log_text", "").startswith("(UDP Port")], [])

        return d.addCallback(check)


