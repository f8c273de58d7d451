"""The dkimsign check: submitted mail gets missing Date/Message-ID and verifying DKIM signatures."""

from __future__ import annotations

import os
import re
from typing import Any

import dkim
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import headers
from mailstack.checks import dkimsign
from mailstack.dkim import canon, keys, signer
from mailstack.intake import ReceivedMessage
from mailstack.interfaces import IMessage, IMessageCheck, IMessageObserver
from mailstack.pipeline import Connection, Pipeline, Transaction, Verdict
from tests.support.fakes import run_blocking

NOW = 1796378400.0
CONN = Connection("127.0.0.1", "submission", "mail.example.org", user="alice@example.org")


def message_of(data: bytes, run: Any = run_blocking) -> IMessage:
    reader = headers.HeaderReader()
    reader.feed(data)
    reader.end()
    return ReceivedMessage(reader.fields, len(data), data, 0, run)


class Harness:
    """A check over a real key store; ``send`` runs data_begin, the stream and data."""

    def __init__(self, case: SynchronousTestCase, run: Any = run_blocking) -> None:
        self.store = keys.KeyStore(os.path.abspath(case.mktemp()))
        self.store.ensure_keys(["example.org"], now=NOW)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.signer = signer.DKIMSigner(self.store, lambda d: d == "example.org")
        self.check = dkimsign.DKIMSignCheck(self.signer, run, self.clock)

    def send(self, data: bytes, chunk: int = 7000, message: IMessage | None = None) -> Verdict:
        txn = Transaction(None, {})
        observer = self.check.data_begin(CONN, txn)
        for i in range(0, len(data), chunk):
            observer.write(data[i : i + chunk])
        results: list[Any] = []
        self.check.data(CONN, txn, message or message_of(data)).addBoth(results.append)
        verdict = results[0]
        assert isinstance(verdict, Verdict), verdict
        return verdict

    def verifies(self, stored: bytes) -> bool:
        txt = {f"{i.name}.".encode(): i.record.encode() for i in self.store.list()}
        return bool(dkim.verify(stored, dnsfunc=lambda name, timeout=5: txt.get(name)))


SIGNED = b"From: Alice <alice@example.org>\r\nTo: bob@remote.test\r\nSubject: hi\r\n"
DATED = b"Date: Mon, 1 Dec 2025 10:00:00 +0000\r\nMessage-ID: <given@client.test>\r\n"


class CheckTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """The check provides IMessageCheck and runs for submission sessions only, never on the MX."""
        h = Harness(self)
        verifyObject(IMessageCheck, h.check)
        verifyObject(IMessageObserver, h.check.data_begin(CONN, Transaction(None, {})))
        self.assertFalse(h.check.mx)
        self.assertTrue(h.check.submission)

    def test_notRunOnMX(self) -> None:
        """The pipeline never runs the check for an unauthenticated MX session; after AUTH on the MX port it does."""
        h = Harness(self)
        p = Pipeline([h.check], Clock())
        mx = Connection("192.0.2.1", "smtp", "mail.example.org")
        self.assertEqual(p.stages(mx, "data_begin") + p.stages(mx, "data"), ())
        self.assertIsNone(p.data_begin(mx, Transaction(None, {})))
        authed = Connection("192.0.2.1", "smtp", "mail.example.org", user="alice@example.org")
        self.assertEqual(p.stages(authed, "data"), (h.check,))

    def test_signedAndVerifies(self) -> None:
        """A local From gets a signature that dkimpy verifies over the stored message; a changed Subject fails."""
        h = Harness(self)
        data = SIGNED + DATED + b"\r\nHello  there \r\n\r\n\r\n"
        verdict = h.send(data, chunk=5)
        self.assertEqual(len(verdict.prepend), 1)
        self.assertTrue(verdict.prepend[0].startswith(b"DKIM-Signature: "))
        stored = b"".join(verdict.prepend) + data
        self.assertTrue(h.verifies(stored))
        self.assertFalse(h.verifies(stored.replace(b"Subject: hi", b"Subject: hello")))

    def test_smallBodySignedWithoutPool(self) -> None:
        """Once the key file is loaded, a body of at most INLINE bytes is hashed
        and signed without a thread pool call; the first message, whose key file
        must be read, signs in the pool."""
        calls: list[Any] = []

        def counting(f: Any, *a: Any) -> Deferred:
            calls.append(f)
            return run_blocking(f, *a)

        h = Harness(self, run=counting)
        data = SIGNED + DATED + b"\r\n" + b"a line  of text\r\n" * (dkimsign.INLINE // 17)
        first = h.send(data, chunk=4096)
        self.assertEqual(calls, [h.signer.fields])
        del calls[:]
        second = h.send(data, chunk=4096)
        self.assertEqual(calls, [])
        for verdict in (first, second):
            self.assertTrue(h.verifies(b"".join(verdict.prepend) + data))

    def test_bigBodyHashedInBatches(self) -> None:
        """A body of several batches is hashed in order in the pool and the signature verifies."""
        h = Harness(self)
        body = b"".join(b"line %d with  spaces\t \r\n" % i for i in range(60000))
        self.assertGreater(len(body), 3 * dkimsign.BATCH)
        data = SIGNED + DATED + b"\r\n" + body
        verdict = h.send(data, chunk=65536)
        self.assertTrue(h.verifies(b"".join(verdict.prepend) + data))

    def test_backlogFallsBackToStoredCopy(self) -> None:
        """When the pool falls behind by more than BACKLOG, the stored copy is hashed at the end instead."""
        pending: list[Deferred] = []

        def slow(f: Any, *a: Any) -> Deferred:
            d: Deferred = Deferred()
            d.addCallback(lambda _: f(*a))
            pending.append(d)
            return d

        h = Harness(self, run=slow)
        data = SIGNED + DATED + b"\r\n" + (b"y" * 1000 + b"\r\n") * 6000
        txn = Transaction(None, {})
        observer = h.check.data_begin(CONN, txn)
        for i in range(0, len(data), 65536):
            observer.write(data[i : i + 65536])
        self.assertTrue(observer.overflowed)
        results: list[Any] = []
        h.check.data(CONN, txn, message_of(data, run_blocking)).addBoth(results.append)
        while pending:
            pending.pop(0).callback(None)
        self.assertTrue(h.verifies(b"".join(results[0].prepend) + data))

    def test_missingDateAndMessageIdAdded(self) -> None:
        """Date and Message-ID are added when missing, below the signature, and are signed."""
        h = Harness(self)
        data = SIGNED + b"\r\nbody\r\n"
        verdict = h.send(data)
        names = [headers.field_name(raw) for raw in verdict.prepend]
        self.assertEqual(names, ["DKIM-Signature", "Date", "Message-ID"])
        self.assertRegex(verdict.prepend[2].decode(), r"^Message-ID: <[0-9a-f]+\.[0-9a-f]+@mail\.example\.org>\r\n$")
        self.assertIn(b"Date: Fri, 04 Dec 2026 10:00:00 +0000", verdict.prepend[1])
        self.assertIn(b"date:message-id", re.sub(rb"\s", b"", verdict.prepend[0]))
        self.assertTrue(h.verifies(b"".join(verdict.prepend) + data))

    def test_presentDateAndMessageIdKept(self) -> None:
        """Present Date and Message-ID are left alone: only the signature is added."""
        verdict = Harness(self).send(SIGNED + DATED + b"\r\nbody\r\n")
        self.assertEqual([headers.field_name(raw) for raw in verdict.prepend], ["DKIM-Signature"])

    def test_foreignFromOnlyHygiene(self) -> None:
        """A From domain that is not local is not signed; the hygiene fields are still added."""
        verdict = Harness(self).send(b"From: a@remote.test\r\nSubject: s\r\n\r\nbody\r\n")
        self.assertEqual([headers.field_name(raw) for raw in verdict.prepend], ["Date", "Message-ID"])

    def test_everyActiveKeySigns(self) -> None:
        """With an Ed25519 key added, both keys sign and both signatures verify."""
        h = Harness(self)
        h.store.keygen("example.org", "ed", "ed25519", now=NOW)
        data = SIGNED + DATED + b"\r\nbody\r\n"
        verdict = h.send(data)
        self.assertEqual(len(verdict.prepend), 2)
        txt = {f"{i.name}.".encode(): i.record.encode() for i in h.store.list()}
        stored = b"".join(verdict.prepend) + data
        for index in range(2):
            self.assertTrue(dkim.DKIM(stored).verify(idx=index, dnsfunc=lambda n, timeout=5: txt.get(n)))

    def test_build(self) -> None:
        """The factory takes no options and signs with the runtime's signer."""
        runtime = type("R", (), {"signer": object(), "run_blocking": run_blocking, "reactor": Clock()})()
        self.assertIs(dkimsign.build(runtime, {}).signer, runtime.signer)
        self.assertRaises(ValueError, dkimsign.build, runtime, {"x": 1})


class BodyStreamTests(SynchronousTestCase):
    def body(self, data: bytes, chunk: int = 3) -> bytes:
        out: list[bytes] = []
        stream = dkimsign.BodyStream(out.append)
        for i in range(0, len(data), chunk):
            stream.feed(data[i : i + chunk])
        stream.end()
        return b"".join(out)

    def test_bodyAfterEmptyLine(self) -> None:
        """The body is what follows the empty line ending the header section, fed in any chunks."""
        for chunk in (1, 3, 100):
            self.assertEqual(self.body(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\n", chunk), b"body\r\n\r\n")

    def test_edges(self) -> None:
        """No body at all, and a section ended by a line that is no field (as the intake splits it)."""
        self.assertEqual(self.body(b"A: 1\r\n"), b"")
        self.assertEqual(self.body(b"A: 1\r\n\r\n"), b"")
        self.assertEqual(self.body(b"A: 1\r\nnot a field\r\nmore\r\n"), b"not a field\r\nmore\r\n")

    def test_hashStoredMatchesStream(self) -> None:
        """hash_stored gives the BodyHash of the body alone."""
        import io

        expected = canon.BodyHash()
        expected.feed(b"x  y\r\n")
        self.assertEqual(dkimsign.hash_stored(io.BytesIO(b"A: 1\r\n\r\nx  y\r\n")), expected.digest())
