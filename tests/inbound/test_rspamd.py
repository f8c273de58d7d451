"""RspamdClient against an in-process twisted.web server on 127.0.0.1."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface.verify import verifyObject

from mailstack.inbound.interfaces import IRspamdClient
from mailstack.inbound.rspamd import (
    ACCEPT,
    CHUNK,
    REFUSE,
    TAG,
    TEMPFAIL,
    Envelope,
    RspamdClient,
    RspamdUnavailable,
    ThreadedFileBodyProducer,
    verdict_from,
)

ENVELOPE = Envelope(
    "alice@example.org",
    ["bob@example.net", "carol@example.net"],
    "192.0.2.1",
    "client.example",
    "mx.example.net",
    user="",
    queue_id="Q1",
)


class FakeRspamd(Resource):
    """/checkv2: records each request, answers ``reply`` (JSON) with ``code``; ``hang`` never answers."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.reply = {"action": "no action", "score": 0.5, "required_score": 15.0, "symbols": {}}
        self.code = 200
        self.raw = None
        self.hang = False
        self.pending = []

    def render_POST(self, request):
        self.requests.append((request.path, request.requestHeaders, request.content.read()))
        if self.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        return self.raw if self.raw is not None else json.dumps(self.reply).encode()


class ClientTests(TestCase):
    def setUp(self) -> None:
        self.fake = FakeRspamd()
        self.port = reactor.listenTCP(0, Site(self.fake), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.client = RspamdClient(self.url, self.agent, reactor, deferToThread, timeout=20)

    def tearDown(self):
        for request in self.fake.pending:
            request.finish()
        return self.pool.closeCachedConnections()

    def write(self, data):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_provides_interface(self) -> None:
        """RspamdClient provides IRspamdClient."""
        self.assertTrue(verifyObject(IRspamdClient, self.client))

    async def test_envelope_in_headers(self) -> None:
        """From, one Rcpt per recipient, IP, Helo, Hostname and Queue-Id go to /checkv2; no User when
        unauthenticated."""
        verdict = await self.client.scan(b"Subject: x\r\n\r\nhi\r\n", ENVELOPE)
        self.assertEqual(verdict.decision, ACCEPT)
        path, headers, body = self.fake.requests[0]
        self.assertEqual(path, b"/checkv2")
        self.assertEqual(body, b"Subject: x\r\n\r\nhi\r\n")
        self.assertEqual(headers.getRawHeaders(b"from"), [b"alice@example.org"])
        self.assertEqual(headers.getRawHeaders(b"rcpt"), [b"bob@example.net", b"carol@example.net"])
        self.assertEqual(headers.getRawHeaders(b"ip"), [b"192.0.2.1"])
        self.assertEqual(headers.getRawHeaders(b"helo"), [b"client.example"])
        self.assertEqual(headers.getRawHeaders(b"hostname"), [b"mx.example.net"])
        self.assertEqual(headers.getRawHeaders(b"queue-id"), [b"Q1"])
        self.assertIsNone(headers.getRawHeaders(b"user"))

    async def test_user_and_hostile_values(self) -> None:
        """An authenticated user is sent as User; CR/LF in peer-supplied values never split a header."""
        envelope = Envelope("a@example.org\r\nX-Evil: 1", ["b@example.net"], "192.0.2.1", "h\nx", "mx", user="alice")
        await self.client.scan(b"x", envelope)
        _, headers, _ = self.fake.requests[0]
        self.assertEqual(headers.getRawHeaders(b"user"), [b"alice"])
        self.assertIsNone(headers.getRawHeaders(b"x-evil"))
        self.assertEqual(headers.getRawHeaders(b"from"), [b"a@example.org  X-Evil: 1"])

    async def test_large_file_streamed(self) -> None:
        """A message bigger than the in-memory limit is streamed from its file in chunks, intact."""
        data = b"".join(b"line %08d of the message body\r\n" % i for i in range(40000))
        self.assertGreater(len(data), 4 * CHUNK)
        await self.client.scan(self.write(data), ENVELOPE)
        self.assertEqual(self.fake.requests[0][2], data)

    async def test_small_file_sent(self) -> None:
        """A small message file is sent whole."""
        await self.client.scan(self.write(b"Subject: small\r\n\r\nx\r\n"), ENVELOPE)
        self.assertEqual(self.fake.requests[0][2], b"Subject: small\r\n\r\nx\r\n")

    async def test_actions_mapped(self) -> None:
        """reject refuses, soft reject and greylist tempfail, add header and rewrite subject tag."""
        expected = {
            "reject": REFUSE,
            "soft reject": TEMPFAIL,
            "greylist": TEMPFAIL,
            "add header": TAG,
            "rewrite subject": TAG,
            "no action": ACCEPT,
        }
        for action, decision in expected.items():
            self.fake.reply = {"action": action, "score": 7.5, "required_score": 15, "symbols": {"A": {}}}
            verdict = await self.client.scan(b"x", ENVELOPE)
            self.assertEqual((verdict.decision, verdict.action, verdict.symbols), (decision, action, ("A",)))

    async def test_http_error_is_unavailable(self) -> None:
        """An HTTP error from rspamd errbacks RspamdUnavailable."""
        self.fake.code = 500
        with self.assertRaises(RspamdUnavailable):
            await self.client.scan(b"x", ENVELOPE)

    async def test_garbage_reply_is_unavailable(self) -> None:
        """A reply that is not a JSON object errbacks RspamdUnavailable."""
        for raw in (b"not json", b"[1, 2]"):
            self.fake.raw = raw
            with self.assertRaises(RspamdUnavailable):
                await self.client.scan(b"x", ENVELOPE)

    async def test_unreachable_is_unavailable(self) -> None:
        """Nothing listening errbacks RspamdUnavailable."""
        await self.port.stopListening()
        with self.assertRaises(RspamdUnavailable):
            await self.client.scan(b"x", ENVELOPE)

    def test_timeout_is_unavailable(self) -> None:
        """No reply within the timeout (on the injected clock) errbacks RspamdUnavailable."""
        clock = Clock()
        self.fake.hang = True
        client = RspamdClient(self.url, self.agent, clock, deferToThread, timeout=5)
        d = client.scan(b"x", ENVELOPE)
        self.assertNoResult(d)
        clock.advance(5)
        self.failureResultOf(d, RspamdUnavailable)


class VerdictTests(SynchronousTestCase):
    def test_tag_headers(self) -> None:
        """Tagging adds X-Spam: yes and the score against the threshold."""
        verdict = verdict_from({"action": "add header", "score": 9, "required_score": 15})
        self.assertEqual(verdict.headers, (("X-Spam", "yes"), ("X-Spam-Score", "9.00 / 15.00")))

    def test_rewrite_subject(self) -> None:
        """rewrite subject carries rspamd's new Subject."""
        verdict = verdict_from(
            {"action": "rewrite subject", "score": 9, "required_score": 15, "subject": "*** SPAM *** hi"}
        )
        self.assertEqual(verdict.subject, "*** SPAM *** hi")

    def test_unknown_action_accepts(self) -> None:
        """An action this version does not know is accepted without tags."""
        verdict = verdict_from({"action": "something new", "score": 1})
        self.assertEqual((verdict.decision, verdict.headers), (ACCEPT, ()))


class ProducerTests(SynchronousTestCase):
    def test_pause_holds_reads_and_stop_never_fires(self) -> None:
        """pauseProducing holds the next read; after stopProducing the start Deferred never fires."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"a" * (3 * CHUNK))
        calls = []

        def run_now(f, *args):
            calls.append(f.__name__)
            return succeed(f(*args))

        producer = ThreadedFileBodyProducer(path, 3 * CHUNK, run_now)

        class Consumer:
            def __init__(self):
                self.data = []

            def write(self, data):
                self.data.append(data)
                producer.pauseProducing()

        consumer = Consumer()
        d = producer.startProducing(consumer)
        self.assertEqual(len(consumer.data), 1)
        producer.resumeProducing()
        self.assertEqual(len(consumer.data), 2)
        producer.stopProducing()
        self.assertNoResult(d)
        self.assertEqual(calls[-1], "close")
        self.assertIsInstance(d, Deferred)
