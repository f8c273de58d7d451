"""Intake: Received: header, streaming to the queue, one commit, kick, error replies."""

from __future__ import annotations

import errno
import os

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import config, headers
from mailstack.address import parse_address
from mailstack.delivery.local import LocalAgent
from mailstack.envelope import Destination, Envelope, HeaderChanges
from mailstack.errors import PermanentFailure, TemporaryFailure
from mailstack.intake import SPILL_AT, Intake, received_header
from mailstack.interfaces import IIncoming, IIntake, IMessage
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.queue.store import QueueStore
from mailstack.storage.maildir import MaildirStore
from mailstack.threadpool import INLINE_BYTES
from tests.storage.faults import Faults, count_steps, scratch_path

NOW = 1764341555.0  # Fri, 28 Nov 2025 14:52:35 +0000
QID = "0661576198ba5cabcdef0123"
BOB = parse_address("Bob@example.org")
CAROL = parse_address("Carol@Remote.example")
MESSAGE = b"Subject: hi\r\n\r\n.dot\r\n\xe9\r\n"
BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100  # more than SPILL_AT: streamed to queue/tmp


def run_blocking(f, *args, **kwargs):
    return maybeDeferred(f, *args, **kwargs)


def local(address, original=None) -> Destination:
    return Destination(address, original or address, True)


def remote(address) -> Destination:
    return Destination(address, address, False)


class ManualThreads:
    """A run_blocking that queues calls until the test runs them, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, f, *args, **kwargs):
        d = Deferred()
        self.calls.append((f, args, kwargs, d))
        return d

    def names(self) -> list[str]:
        return [f.__name__ for f, _, _, _ in self.calls]

    def run_one(self, index: int = 0) -> None:
        f, args, kwargs, d = self.calls.pop(index)
        maybeDeferred(f, *args, **kwargs).chainDeferred(d)

    def run_all(self) -> None:
        while self.calls:
            self.run_one()


class Kicker:
    def __init__(self) -> None:
        self.kicked: list[str] = []

    def kick(self, queue_id: str) -> None:
        self.kicked.append(queue_id)


def envelope(*recipients: Destination, **kwargs) -> Envelope:
    defaults = dict(
        sender=parse_address("alice@example.net"),
        recipients=recipients or (local(BOB),),
        helo="client.example.net",
        peer="192.0.2.1",
        protocol="ESMTP",
    )
    defaults.update(kwargs)
    return Envelope(**defaults)


class ReceivedHeaderTests(SynchronousTestCase):
    def test_format(self) -> None:
        """from/by/with/id/for and an RFC 5322 date, folded with CRLF TAB."""
        header = received_header(envelope(), "mx.example.org", QID, NOW)
        self.assertEqual(
            header,
            b"Received: from client.example.net ([192.0.2.1]) by mx.example.org with ESMTP\r\n"
            b"\tid 0661576198ba5cabcdef0123 for <Bob@example.org>;\r\n"
            b"\tFri, 28 Nov 2025 14:52:35 +0000\r\n",
        )

    def test_tlsAndAuth(self) -> None:
        """The RFC 3848 protocol keyword and the TLS version and cipher as a comment."""
        env = envelope(protocol="ESMTPSA", tls="TLSv1.3 TLS_AES_256_GCM_SHA384")
        header = received_header(env, "mx.example.org", QID, NOW).decode()
        self.assertIn("with ESMTPSA (TLSv1.3 TLS_AES_256_GCM_SHA384)", " ".join(header.split()))

    def test_ipv6Literal(self) -> None:
        """An IPv6 peer is written as an RFC 5321 IPv6 address literal."""
        header = received_header(envelope(peer="2001:db8::1"), "mx.example.org", QID, NOW)
        self.assertIn(b"([IPv6:2001:db8::1])", header)

    def test_noForWithSeveralRecipients(self) -> None:
        """With more than one recipient there is no 'for' clause (Bcc privacy)."""
        header = received_header(envelope(local(BOB), remote(CAROL)), "mx.example.org", QID, NOW)
        self.assertNotIn(b" for ", header)
        self.assertIn(b"id 0661576198ba5cabcdef0123;", header)

    def test_aliasExpansionCountsOnce(self) -> None:
        """One RCPT that expanded to several mailboxes still names that one recipient."""
        alias = parse_address("team@example.org")
        env = envelope(Destination(BOB, alias, True), Destination(CAROL, alias, False))
        self.assertIn(b"for <team@example.org>;", received_header(env, "mx.example.org", QID, NOW))

    def test_generatedMessageHasNoFrom(self) -> None:
        """A message made here (a DSN: no peer, no HELO) has no 'from' clause."""
        header = received_header(envelope(helo="", peer="", sender=None), "mx.example.org", QID, NOW)
        self.assertTrue(header.startswith(b"Received: by mx.example.org with ESMTP"))

    def test_hostileHeloIsNeutralised(self) -> None:
        """Spaces, parentheses, semicolons and CR/LF in HELO cannot shape the header."""
        header = received_header(envelope(helo="evil (x); \r\nX-Injected: 1"), "mx.example.org", QID, NOW)
        self.assertEqual(header.count(b"\r\n"), header.count(b"\r\n\t") + 1)
        self.assertNotIn(b"\r\nX-Injected", header)
        self.assertIn(b"from evil??x?????X-Injected:?1 ([192.0.2.1])", header)

    def test_linesShort(self) -> None:
        """Every line stays below 998 octets even with a 4000-byte HELO (RFC 5322 2.1.1)."""
        header = received_header(envelope(helo="h" * 4000, tls="x" * 3000), "mx.example.org", QID, NOW)
        for line in header.split(b"\r\n"):
            self.assertLess(len(line), 998)

    def test_foldsBetweenClauses(self) -> None:
        """Folded lines keep to 78 characters when the clauses allow it."""
        header = received_header(
            envelope(protocol="ESMTPS", tls="TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256"), "mx.example.org", QID, NOW
        )
        for line in header.split(b"\r\n"):
            self.assertLessEqual(len(line), 78)


class IntakeTestMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = QueueStore(scratch_path(self))
        self.store.recover()
        self.kicker = Kicker()
        self.config = config.from_mapping({"hostname": "mx.example.org", "domains": {"local": ["example.org"]}})
        self.intake = Intake(self.config, self.store, self.kicker, run_blocking, self.clock)

    def send(self, env: Envelope, *chunks: bytes):
        incoming = self.intake.begin(env)
        for chunk in chunks:
            incoming.write(chunk)
        return incoming, incoming.finish()

    def queue_files(self) -> dict[str, list[str]]:
        return {d: sorted(os.listdir(os.path.join(self.store.root, d))) for d in ("tmp", "msg", "env")}

    def queued(self, queue_id: str) -> bytes:
        """The queued message's bytes, inside its envelope or in msg/."""
        return self.store.read_message(queue_id)


class IntakeTests(IntakeTestMixin, SynchronousTestCase):
    def test_interfaces(self) -> None:
        """Intake provides IIntake and its messages IIncoming."""
        verifyObject(IIntake, self.intake)
        verifyObject(IIncoming, self.intake.begin(envelope()))

    def test_acceptedMessageQueued(self) -> None:
        """finish() fires with the queue id; the queue holds Received: plus the bytes, byte for byte."""
        incoming, d = self.send(envelope(), MESSAGE[:5], MESSAGE[5:])
        queue_id = self.successResultOf(d)
        self.assertEqual(queue_id, incoming.queue_id)
        header = received_header(envelope(), "mx.example.org", queue_id, NOW)
        self.assertEqual(self.queued(queue_id), header + MESSAGE)
        self.assertEqual(self.queue_files()["tmp"], [])

    def test_smallMessageInsideItsEnvelope(self) -> None:
        """A message held in memory is queued as one file: inside its envelope, no msg/<id>;
        every byte value survives the round trip."""
        body = MESSAGE + bytes(range(256)) + b"\r\n"
        _, d = self.send(envelope(remote(CAROL)), body)
        queue_id = self.successResultOf(d)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": [queue_id + ".json"]})
        entry, message = self.store.load_message(queue_id)
        self.assertEqual(message, received_header(envelope(remote(CAROL)), "mx.example.org", queue_id, NOW) + body)
        self.assertEqual(entry.size, len(message))

    def test_envelopeRecord(self) -> None:
        """The entry records sender, arrival, size, user, peer and one state per recipient."""
        env = envelope(local(BOB), remote(CAROL), user="alice@example.net")
        incoming, d = self.send(env, MESSAGE)
        queue_id = self.successResultOf(d)
        entry = self.store.load(queue_id)
        self.assertEqual(
            entry,
            QueueEntry(
                id=queue_id,
                sender="alice@example.net",
                arrival=NOW,
                recipients=[
                    RecipientState(address="bob@example.org", original="Bob@example.org", local=True),
                    RecipientState(address="Carol@remote.example", original="Carol@remote.example", local=False),
                ],
                size=len(self.queued(queue_id)),
                user="alice@example.net",
                peer="192.0.2.1",
            ),
        )
        self.assertEqual(incoming.size, len(MESSAGE))

    def test_nullSender(self) -> None:
        """The null reverse-path <> is stored as the empty string."""
        _, d = self.send(envelope(sender=None), MESSAGE)
        self.assertEqual(self.store.load(self.successResultOf(d)).sender, "")

    def test_duplicateDestinationsMerged(self) -> None:
        """Two RCPTs that reach the same mailbox give one recipient state (the first original)."""
        alias = parse_address("team@example.org")
        env = envelope(
            local(BOB), Destination(BOB, alias, True), Destination(parse_address("bob@example.org"), alias, True)
        )
        _, d = self.send(env, MESSAGE)
        entry = self.store.load(self.successResultOf(d))
        self.assertEqual([(r.address, r.original) for r in entry.recipients], [("bob@example.org", "Bob@example.org")])

    def test_kickAfterCommit(self) -> None:
        """The manager is kicked with the id only once the entry is on disk."""
        seen = []
        self.kicker.kick = lambda queue_id: seen.append(os.path.exists(self.store.envelope_path(queue_id)))
        _, d = self.send(envelope(), MESSAGE)
        self.successResultOf(d)
        self.assertEqual(seen, [True])

    def test_kickFailureStillAccepts(self) -> None:
        """A failing kick does not turn an accepted message into an error."""

        def broken(queue_id: str) -> None:
            raise RuntimeError("boom")

        self.kicker.kick = broken
        _, d = self.send(envelope(), MESSAGE)
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def commit_in_one_call(self, message: bytes) -> str:
        """Send ``message``; check that its commit is one run_blocking call and
        that nothing is acknowledged, visible or kicked before that call ran."""
        threads = ManualThreads()
        intake = Intake(self.config, self.store, self.kicker, threads, self.clock)
        incoming = intake.begin(envelope())
        incoming.write(message)
        d = incoming.finish()
        self.assertNoResult(d)
        self.assertEqual(threads.names(), ["commit"])  # one thread hand-off per message
        self.assertEqual((list(self.store.scan()), self.kicker.kicked), ([], []))
        threads.run_one()
        self.assertEqual(threads.names(), [])
        self.assertEqual(self.successResultOf(d), incoming.queue_id)
        self.assertEqual(self.kicker.kicked, [incoming.queue_id])
        return incoming.queue_id

    def test_commitRunsInThread(self) -> None:
        """The commit is one run_blocking call per message (held in memory: inside its envelope); nothing is
        acknowledged or kicked before it returns."""
        queue_id = self.commit_in_one_call(MESSAGE)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": [queue_id + ".json"]})

    def test_spilledCommitRunsInThread(self) -> None:
        """A streamed message is committed by one run_blocking call too, into msg/ and env/."""
        queue_id = self.commit_in_one_call(BIG)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [queue_id], "env": [queue_id + ".json"]})

    def test_abortAfterFinishIsIgnored(self) -> None:
        """A client that disconnects while the commit runs does not undo the commit."""
        threads = ManualThreads()
        intake = Intake(self.config, self.store, self.kicker, threads, self.clock)
        incoming = intake.begin(envelope())
        incoming.write(MESSAGE)
        d = incoming.finish()
        incoming.abort()
        threads.run_all()
        self.assertEqual(self.successResultOf(d), incoming.queue_id)
        self.assertEqual(self.store.load(incoming.queue_id).id, incoming.queue_id)

    def test_oneLogEventPerMessage(self) -> None:
        """Acceptance logs one event with queue id, peer, user, sender, recipients and size."""
        with capturedLogs() as events:
            _, d = self.send(envelope(user="alice@example.net"), MESSAGE)
            queue_id = self.successResultOf(d)
        accepted = [e for e in events if e.get("queue_id") == queue_id]
        self.assertEqual(len(accepted), 1)
        event = accepted[0]
        self.assertEqual(event["peer"], "192.0.2.1")
        self.assertEqual(event["user"], "alice@example.net")
        self.assertEqual(event["sender"], "alice@example.net")
        self.assertEqual(event["recipients"], ["bob@example.org"])
        self.assertEqual(event["size"], len(self.queued(queue_id)))

    def test_smallMessageStaysInMemory(self) -> None:
        """Until it is committed, a small message touches no file (the commit writes it in a thread)."""
        incoming = self.intake.begin(envelope())
        incoming.write(MESSAGE)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})
        self.successResultOf(incoming.finish())
        self.assertEqual(len(self.queue_files()["env"]), 1)

    def test_bigMessageStreamedToDisk(self) -> None:
        """Beyond SPILL_AT the bytes go to queue/tmp/<id> as they arrive, not into memory; queued byte for byte."""
        incoming = self.intake.begin(envelope())
        for i in range(0, len(BIG), 1000):
            incoming.write(BIG[i : i + 1000])
        self.assertEqual(self.queue_files()["tmp"], [incoming.queue_id])
        self.assertLess(sum(map(len, incoming._held)), SPILL_AT)
        queue_id = self.successResultOf(incoming.finish())
        self.assertEqual(self.queued(queue_id), received_header(envelope(), "mx.example.org", queue_id, NOW) + BIG)

    def test_abortRemovesTmp(self) -> None:
        """abort() discards what was written; nothing is queued or kicked."""
        incoming = self.intake.begin(envelope())
        incoming.write(BIG)
        self.assertEqual(len(self.queue_files()["tmp"]), 1)
        incoming.abort()
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})
        self.assertEqual(self.kicker.kicked, [])

    def test_finishTwice(self) -> None:
        """A second finish() (or finish after abort) fails with 451 and changes nothing."""
        incoming, d = self.send(envelope(), MESSAGE)
        self.successResultOf(d)
        failure = self.failureResultOf(incoming.finish(), TemporaryFailure)
        self.assertEqual(failure.value.reply.code, 451)
        self.assertEqual(len(self.queue_files()["env"]), 1)


class IntakeErrorTests(IntakeTestMixin, SynchronousTestCase):
    def assertRefused(self, d, code: int, enhanced: str) -> None:
        failure = self.failureResultOf(d, TemporaryFailure)
        self.assertEqual((failure.value.reply.code, failure.value.reply.enhanced), (code, enhanced))
        self.assertNotIn("/", failure.value.reply.text)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})
        self.assertEqual(self.kicker.kicked, [])

    def test_commitFailureAtEveryStep(self) -> None:
        """I/O errors at any commit step, of a message held in memory or streamed to tmp/, give 451 4.3.0,
        ENOSPC 452 4.3.1; nothing half-written remains."""
        for body in (MESSAGE, BIG):
            probe = self.intake.begin(envelope())
            probe.write(body)
            steps = count_steps(self, lambda probe=probe: self.successResultOf(probe.finish()))
            self.store.remove(probe.queue_id)
            self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})
            self.assertEqual(len(steps), 6 if body is MESSAGE else 11)  # open, write, fsync, rename, open, fsync
            self.kicker.kicked.clear()
            for error, code, enhanced in (
                (errno.EIO, 451, "4.3.0"),
                (errno.ENOSPC, 452, "4.3.1"),
                (errno.EDQUOT, 452, "4.3.1"),
            ):
                for k in range(1, len(steps) + 1):
                    incoming = self.intake.begin(envelope())
                    incoming.write(body)
                    faults = Faults(self, fail_at=k, error=error)
                    d = incoming.finish()
                    faults.restore()
                    self.assertRefused(d, code, enhanced)

    def test_writeFailure(self) -> None:
        """A full disk while streaming is reported at finish() as 452 4.3.1, tmp removed."""
        incoming = self.intake.begin(envelope())
        incoming.write(BIG)  # spilled to queue/tmp

        class Full:
            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self):
                pass

        incoming._file.close()
        incoming._file = Full()
        incoming.write(MESSAGE)
        incoming.write(MESSAGE)  # ignored after the first error
        self.assertRefused(incoming.finish(), 452, "4.3.1")

    def test_flushFailureAtFinish(self) -> None:
        """A full disk when the write buffer is flushed at finish() gives 452 4.3.1."""
        incoming = self.intake.begin(envelope())
        incoming.write(BIG)  # spilled to queue/tmp
        real = incoming._file

        class FullOnClose:
            def write(self, data):
                return real.write(data)

            def close(self):
                real.close()
                raise OSError(errno.ENOSPC, "No space left on device")

        incoming._file = FullOnClose()
        incoming.write(MESSAGE)
        self.assertRefused(incoming.finish(), 452, "4.3.1")

    def test_openFailure(self) -> None:
        """If tmp/ cannot even be created, finish() answers 451 4.3.0."""
        Faults(self, fail_at=1)
        incoming = self.intake.begin(envelope())
        incoming.write(MESSAGE)
        self.assertRefused(incoming.finish(), 451, "4.3.0")

    def test_unexpectedErrorIsTemporary(self) -> None:
        """A bug in the commit is logged and answered 451 4.3.0, never a 5xx or a traceback."""

        def broken(entry, data=None):
            raise RuntimeError("bug")

        self.patch(self.store, "commit", broken)
        incoming, d = self.send(envelope(), MESSAGE)
        failure = self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(failure.value.reply.code, 451)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})


class DirectDeliveryTests(IntakeTestMixin, SynchronousTestCase):
    """All-local messages go straight into the Maildirs, without the queue."""

    def setUp(self) -> None:
        super().setUp()
        self.maildirs = MaildirStore(scratch_path(self), hostname="mx.example.org")
        self.local = LocalAgent(self.maildirs, self.store, run_blocking)
        self.intake = Intake(self.config, self.store, self.kicker, run_blocking, self.clock, local=self.local)
        self.dave = parse_address("dave@example.org")

    def mailbox(self, address, sub: str = "new") -> list[bytes]:
        folder = os.path.join(self.maildirs.path_for(address), sub)
        out = []
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            with open(os.path.join(folder, name), "rb") as f:
                out.append(f.read())
        return out

    def test_localMessageDelivered(self) -> None:
        """The Maildir gets Return-Path, Delivered-To, Received and the bytes; nothing is queued; no kick."""
        _, d = self.send(envelope(local(BOB), local(self.dave)), MESSAGE)
        queue_id = self.successResultOf(d)
        header = received_header(envelope(local(BOB), local(self.dave)), "mx.example.org", queue_id, NOW)
        for address in ("bob@example.org", "dave@example.org"):
            prefix = f"Return-Path: <alice@example.net>\r\nDelivered-To: {address}\r\n".encode()
            self.assertEqual(self.mailbox(parse_address(address)), [prefix + header + MESSAGE])
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})
        self.assertEqual(self.kicker.kicked, [])
        self.assertEqual(self.mailbox(BOB, "tmp"), [])

    def test_spilledMessageDelivered(self) -> None:
        """A message streamed to queue/tmp is copied from there; the spill file is gone afterwards."""
        incoming, d = self.send(envelope(), BIG)
        queue_id = self.successResultOf(d)
        header = received_header(envelope(), "mx.example.org", queue_id, NOW)
        prefix = b"Return-Path: <alice@example.net>\r\nDelivered-To: bob@example.org\r\n"
        self.assertEqual(self.mailbox(BOB), [prefix + header + BIG])
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})

    def test_acknowledgedOnlyOnceInNew(self) -> None:
        """One thread call writes the copy and moves it into new/; the reply waits for that call."""
        threads = ManualThreads()
        intake = Intake(self.config, self.store, self.kicker, threads, self.clock, local=self.local)
        incoming = intake.begin(envelope())
        incoming.write(MESSAGE)
        d = incoming.finish()
        self.assertEqual(threads.names(), ["deliver_direct"])
        self.assertNoResult(d)
        self.assertEqual((self.mailbox(BOB, "tmp"), self.mailbox(BOB)), ([], []))
        threads.run_one()
        self.assertEqual(threads.names(), [])
        self.assertEqual(self.successResultOf(d), incoming.queue_id)
        self.assertEqual((self.mailbox(BOB, "tmp"), len(self.mailbox(BOB))), ([], 1))
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})

    def test_mixedMessageGoesToTheManager(self) -> None:
        """A message with a remote recipient is queued whole and kicked, not delivered directly."""
        _, d = self.send(envelope(local(BOB), remote(CAROL)), MESSAGE)
        queue_id = self.successResultOf(d)
        self.assertEqual(self.kicker.kicked, [queue_id])
        self.assertEqual(self.mailbox(BOB), [])
        self.assertEqual([e.id for e in self.store.scan()], [queue_id])

    def test_maildirWriteFailureQueuesTheMessage(self) -> None:
        """If a copy cannot be written, the whole message is queued (no copy kept anywhere) and the manager kicked."""
        real = self.maildirs.prepare

        def failing(address, source, prefix=b""):
            if address == "dave@example.org":
                raise OSError(errno.ENOSPC, "full")
            return real(address, source, prefix)

        self.patch(self.maildirs, "prepare", failing)
        _, d = self.send(envelope(local(BOB), local(self.dave)), MESSAGE)
        queue_id = self.successResultOf(d)
        self.assertEqual(self.kicker.kicked, [queue_id])
        entry = self.store.load(queue_id)
        self.assertEqual(
            [(r.address, r.status) for r in entry.recipients],
            [("bob@example.org", "pending"), ("dave@example.org", "pending")],
        )
        self.assertEqual((self.mailbox(BOB), self.mailbox(BOB, "tmp")), ([], []))

    def test_partialPublishFailureQueuesOnlyWhatIsOwed(self) -> None:
        """If one copy cannot be moved into new/, only that recipient is queued; each outcome is logged."""
        self.maildirs.deliver(self.dave, [b"x"])
        real = self.maildirs.publish

        def failing(pending):
            for p in pending:
                if "dave" in p.new_dir:
                    os.unlink(p.tmp_path)  # the rename will fail with ENOENT
            return real(pending)

        self.patch(self.maildirs, "publish", failing)
        with capturedLogs() as events:
            _, d = self.send(envelope(local(BOB), local(self.dave)), MESSAGE)
            queue_id = self.successResultOf(d)
        self.assertEqual(self.kicker.kicked, [queue_id])
        self.assertEqual([r.address for r in self.store.load(queue_id).recipients], ["dave@example.org"])
        self.assertEqual(len(self.mailbox(BOB)), 1)
        outcomes = [(e["rcpt"], e.get("status")) for e in events if e.get("queue_id") == queue_id and "rcpt" in e]
        self.assertEqual(len(outcomes), 2)
        self.assertEqual(outcomes[0][0], "bob@example.org")
        self.assertEqual(outcomes[1], ("dave@example.org", "deferred"))
        queued = [e for e in events if e.get("queue_id") == queue_id and e.get("outcome")]
        self.assertEqual([(e["outcome"], e["recipients"]) for e in queued], [("queued", ["dave@example.org"])])

    def test_refusedWhenTheQueueFailsToo(self) -> None:
        """A full disk for the Maildir and for the queue: 452 4.3.1, no copy and no queue file anywhere."""
        self.patch(self.maildirs, "prepare", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        self.patch(self.store, "commit", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        _, d = self.send(envelope(), MESSAGE)
        failure = self.failureResultOf(d, TemporaryFailure)
        self.assertEqual((failure.value.reply.code, failure.value.reply.enhanced), (452, "4.3.1"))
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})
        self.assertEqual((self.mailbox(BOB), self.mailbox(BOB, "tmp"), self.kicker.kicked), ([], [], []))

    def test_oneLogEventPerMessage(self) -> None:
        """A direct delivery logs one event: queue id, sender, recipients, size and where it went."""
        with capturedLogs() as events:
            _, d = self.send(envelope(local(BOB), local(self.dave)), MESSAGE)
            queue_id = self.successResultOf(d)
        mine = [e for e in events if e.get("queue_id") == queue_id]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0]["recipients"], ["bob@example.org", "dave@example.org"])
        self.assertEqual(mine[0]["outcome"], "delivered")

    def test_faultAtEveryStep(self) -> None:
        """An I/O error at any step: delivered once, or queued with no copy in new/; never lost, never twice.

        The queue takes over whatever the direct path cannot finish, so one
        fault never refuses a message, except where a big message's spill
        file cannot be written at all.
        """
        for message in (MESSAGE, BIG):
            outcomes = set()
            k = 0
            while True:
                k += 1
                store = QueueStore(scratch_path(self))
                store.recover()
                maildirs = MaildirStore(scratch_path(self), hostname="mx.example.org")
                kicker = Kicker()
                local = LocalAgent(maildirs, store, run_blocking)
                intake = Intake(self.config, store, kicker, run_blocking, self.clock, local=local)
                faults = Faults(self, fail_at=k)
                incoming = intake.begin(envelope())
                incoming.write(message)
                d = incoming.finish()
                faults.restore()
                new_dir = os.path.join(maildirs.path_for(BOB), "new")
                new = os.listdir(new_dir) if os.path.isdir(new_dir) else []
                queued = [e.id for e in store.scan()]
                if isinstance(d.result, Failure):  # only creating the spill file can refuse
                    self.failureResultOf(d, TemporaryFailure)
                    self.assertEqual((message, queued, new), (BIG, [], []), f"step {k}")
                    outcomes.add("refused")
                elif queued:
                    self.assertEqual((queued, kicker.kicked, new), ([incoming.queue_id], queued, []), f"step {k}")
                    outcomes.add("queued")
                else:
                    self.assertEqual(len(new), 1, f"step {k}")
                    outcomes.add("delivered")
                if k > len(faults.calls):  # no fault this time
                    self.assertEqual(queued, [])
                    break
            self.flushLoggedErrors()
            self.assertEqual(outcomes, {"queued", "delivered"} | ({"refused"} if message is BIG else set()))
            self.assertGreater(k, 6)

    def test_waitIdle(self) -> None:
        """wait_idle() fires at once with nothing in flight, else only once the commit ended."""
        self.successResultOf(self.intake.wait_idle())
        threads = ManualThreads()
        intake = Intake(self.config, self.store, self.kicker, threads, self.clock, local=self.local)
        incoming = intake.begin(envelope())
        incoming.write(MESSAGE)
        d = incoming.finish()
        incoming.abort()  # the client left: the commit goes on
        idle = intake.wait_idle()
        self.assertNoResult(idle)
        threads.run_one()
        self.successResultOf(idle)
        self.successResultOf(d)
        self.assertEqual(len(self.mailbox(BOB)), 1)


EDITED_HEADER = b"Subject: big\r\nX-Spam: forged\r\n\tcontinued\r\nFrom: <alice@example.net>\r\n"
CHANGES = HeaderChanges(
    prepend=(b"Authentication-Results: mx.example.org; none\r\n", b"X-Checked: yes\r\n"),
    remove=(lambda name, raw: name.lower() == "x-spam",),
)
KEPT = b"Subject: big\r\nFrom: <alice@example.net>\r\n"


class HeaderChangeTests(IntakeTestMixin, SynchronousTestCase):
    """The end-of-data checks' header changes, applied before the commit."""

    def received(self, queue_id: str) -> bytes:
        return received_header(envelope(), "mx.example.org", queue_id, NOW)

    def stored(self, queue_id: str) -> bytes:
        return self.queued(queue_id)

    def deliver(self, body: bytes, changes: HeaderChanges | None = CHANGES, chunk: int = 1000):
        incoming = self.intake.begin(envelope())
        data = EDITED_HEADER + body
        for i in range(0, len(data), chunk):
            incoming.write(data[i : i + chunk])
        message = incoming.message()
        return incoming, message, incoming.finish(changes)

    def assertEdited(self, body: bytes) -> None:
        _, _, d = self.deliver(body)
        queue_id = self.successResultOf(d)
        expected = self.received(queue_id) + b"".join(CHANGES.prepend) + KEPT + body
        self.assertEqual(self.stored(queue_id), expected)
        self.assertEqual(self.store.load(queue_id).size, len(expected))
        self.assertEqual(self.queue_files()["tmp"], [])

    def test_smallMessageEdited(self) -> None:
        """In memory: Received: first, then the added fields, the kept fields and the body as sent."""
        self.assertEdited(b"\r\n.dot\r\nbody\r\n")

    def test_spilledMessageEdited(self) -> None:
        """Spilled to queue/tmp: the same result, written in a thread, no temporary file left."""
        body = b"\r\n" + (b"y" * 998 + b"\r\n") * 200
        self.assertGreater(len(body), SPILL_AT)
        self.assertEdited(body)

    def test_spilledMessageEditedInAThread(self) -> None:
        """The rewrite of a spilled file runs through run_blocking, before the queue's own steps."""
        threads = ManualThreads()
        self.intake = Intake(self.config, self.store, self.kicker, threads, self.clock)
        _, _, d = self.deliver(b"\r\n" + b"y" * (SPILL_AT * 2) + b"\r\n")
        self.assertEqual(threads.names(), ["rewrite"])
        threads.run_all()
        self.successResultOf(d)

    def test_noChangesNoRewrite(self) -> None:
        """Without changes a spilled message is committed as streamed (no extra thread call)."""
        threads = ManualThreads()
        self.intake = Intake(self.config, self.store, self.kicker, threads, self.clock)
        _, _, d = self.deliver(b"\r\n" + b"y" * (SPILL_AT * 2) + b"\r\n", HeaderChanges())
        self.assertNotIn("rewrite", threads.names())
        threads.run_all()
        queue_id = self.successResultOf(d)
        self.assertTrue(self.stored(queue_id).startswith(self.received(queue_id) + EDITED_HEADER))

    def test_directDeliveryEdited(self) -> None:
        """A spilled local message reaches the Maildir with the changes applied."""
        maildirs = MaildirStore(scratch_path(self), hostname="mx.example.org")
        local = LocalAgent(maildirs, self.store, run_blocking)
        self.intake = Intake(self.config, self.store, self.kicker, run_blocking, self.clock, local=local)
        body = b"\r\n" + b"y" * (SPILL_AT * 2) + b"\r\n"
        _, _, d = self.deliver(body)
        queue_id = self.successResultOf(d)
        folder = os.path.join(maildirs.path_for(BOB), "new")
        [name] = os.listdir(folder)
        with open(os.path.join(folder, name), "rb") as f:
            delivered = f.read()
        self.assertTrue(delivered.endswith(self.received(queue_id) + b"".join(CHANGES.prepend) + KEPT + body))
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})

    def test_messageView(self) -> None:
        """message(): the client's header fields (not our Received:), its size, and a reader in a thread."""
        for body in (b"\r\nshort\r\n", b"\r\n" + b"y" * (SPILL_AT * 2) + b"\r\n"):
            incoming = self.intake.begin(envelope())
            incoming.write(EDITED_HEADER + body)
            message = incoming.message()
            verifyObject(IMessage, message)
            self.assertEqual([n for n, _ in message.header], ["Subject", "X-Spam", "From"])
            self.assertEqual(message.size, len(EDITED_HEADER + body))
            self.assertEqual(self.successResultOf(message.run_blocking(lambda f: f.read())), EDITED_HEADER + body)
            incoming.abort()
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})

    def test_smallMessageReadInline(self) -> None:
        """A message held in memory and at most INLINE_BYTES long is read at once,
        without a thread call; a bigger one (in memory or spilled) goes to the pool."""
        threads = ManualThreads()
        self.intake = Intake(self.config, self.store, self.kicker, threads, self.clock)
        small = b"\r\n" + b"s" * (INLINE_BYTES - len(EDITED_HEADER) - 2)
        for body, inline in ((small, True), (small + b"s", False), (b"\r\n" + b"y" * (SPILL_AT * 2), False)):
            incoming = self.intake.begin(envelope())
            incoming.write(EDITED_HEADER + body)
            d = incoming.message().run_blocking(lambda f: f.read())
            self.assertEqual(threads.names(), [] if inline else ["_read"])
            threads.run_all()
            self.assertEqual(self.successResultOf(d), EDITED_HEADER + body)
            incoming.abort()
            threads.run_all()

    def test_headerSectionTooBig(self) -> None:
        """A header section beyond HEADER_LIMIT is refused 552 5.3.4 and nothing is kept."""
        incoming = self.intake.begin(envelope())
        field = b"X-Filler: " + b"z" * 900 + b"\r\n"
        for _ in range(headers.HEADER_LIMIT // len(field) + 2):
            incoming.write(field)
        incoming.write(b"\r\nbody\r\n")
        incoming.message()
        failure = self.failureResultOf(incoming.finish(), PermanentFailure)
        self.assertEqual((failure.value.reply.code, failure.value.reply.enhanced), (552, "5.3.4"))
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})

    def test_rewriteFailureIsTemporary(self) -> None:
        """If the edited file cannot be written the client gets 451 and nothing is left."""

        def broken(path, head, offset):
            raise OSError(5, "I/O error")

        self.patch(headers, "rewrite", broken)
        _, _, d = self.deliver(b"\r\n" + b"y" * (SPILL_AT * 2) + b"\r\n")
        failure = self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(failure.value.reply.code, 451)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})

    def test_failingRemovePredicateIsTemporary(self) -> None:
        """A check's remove predicate that raises at commit time: 451, logged, nothing left."""

        def broken(name, raw):
            raise RuntimeError("predicate bug")

        _, _, d = self.deliver(b"\r\n" + b"y" * (SPILL_AT * 2) + b"\r\n", HeaderChanges(remove=(broken,)))
        failure = self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(failure.value.reply.code, 451)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})
