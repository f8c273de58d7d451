"""Intake: Received: header, streaming to the queue, one commit, kick, error replies."""

from __future__ import annotations

import errno
import os

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import config
from mailstack.address import parse_address
from mailstack.envelope import Destination, Envelope
from mailstack.errors import TemporaryFailure
from mailstack.intake import Intake, received_header
from mailstack.interfaces import IIncoming, IIntake
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.queue.store import QueueStore
from tests.storage.faults import Faults, scratch_path

NOW = 1764341555.0  # Fri, 28 Nov 2025 14:52:35 +0000
QID = "0661576198ba5cabcdef0123"
BOB = parse_address("Bob@example.org")
CAROL = parse_address("Carol@Remote.example")
MESSAGE = b"Subject: hi\r\n\r\n.dot\r\n\xe9\r\n"


def run_blocking(f, *args, **kwargs):
    return maybeDeferred(f, *args, **kwargs)


def local(address, original=None) -> Destination:
    return Destination(address, original or address, True)


def remote(address) -> Destination:
    return Destination(address, address, False)


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
        header = received_header(envelope(protocol="ESMTPS", tls="TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256"), "mx.example.org", QID, NOW)
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
        with open(self.store.message_path(queue_id), "rb") as f:
            data = f.read()
        header = received_header(envelope(), "mx.example.org", queue_id, NOW)
        self.assertEqual(data, header + MESSAGE)
        self.assertEqual(self.queue_files()["tmp"], [])

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
                size=os.path.getsize(self.store.message_path(queue_id)),
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
        env = envelope(local(BOB), Destination(BOB, alias, True), Destination(parse_address("bob@example.org"), alias, True))
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

    def test_commitRunsInThread(self) -> None:
        """The commit goes through run_blocking; nothing is acknowledged before it fires."""
        calls = []

        def deferred_blocking(f, *args):
            d = Deferred()
            calls.append((f, args, d))
            return d

        intake = Intake(self.config, self.store, self.kicker, deferred_blocking, self.clock)
        incoming = intake.begin(envelope())
        incoming.write(MESSAGE)
        d = incoming.finish()
        self.assertNoResult(d)
        self.assertEqual(self.kicker.kicked, [])
        f, args, pending = calls[0]
        self.assertEqual(f, self.store.commit)
        pending.callback(f(*args))
        self.assertEqual(self.successResultOf(d), incoming.queue_id)
        self.assertEqual(self.kicker.kicked, [incoming.queue_id])

    def test_abortAfterFinishIsIgnored(self) -> None:
        """A client that disconnects while the commit runs does not undo the commit."""
        calls = []

        def deferred_blocking(f, *args):
            d = Deferred()
            calls.append((f, args, d))
            return d

        intake = Intake(self.config, self.store, self.kicker, deferred_blocking, self.clock)
        incoming = intake.begin(envelope())
        incoming.write(MESSAGE)
        d = incoming.finish()
        incoming.abort()
        self.assertEqual(len(calls), 1)
        f, args, pending = calls[0]
        pending.callback(f(*args))
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
        self.assertEqual(event["size"], os.path.getsize(self.store.message_path(queue_id)))

    def test_abortRemovesTmp(self) -> None:
        """abort() discards what was written; nothing is queued or kicked."""
        incoming = self.intake.begin(envelope())
        incoming.write(MESSAGE)
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
        """I/O errors at any commit step give 451 4.3.0, ENOSPC 452 4.3.1; nothing half-written remains."""
        for error, code, enhanced in ((errno.EIO, 451, "4.3.0"), (errno.ENOSPC, 452, "4.3.1"), (errno.EDQUOT, 452, "4.3.1")):
            for k in range(1, 12):
                incoming = self.intake.begin(envelope())
                incoming.write(MESSAGE)
                faults = Faults(self, fail_at=k, error=error)
                d = incoming.finish()
                faults.restore()
                self.assertRefused(d, code, enhanced)

    def test_writeFailure(self) -> None:
        """A full disk while streaming is reported at finish() as 452 4.3.1, tmp removed."""
        incoming = self.intake.begin(envelope())

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

        def broken(entry):
            raise RuntimeError("bug")

        self.patch(self.store, "commit", broken)
        incoming, d = self.send(envelope(), MESSAGE)
        failure = self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(failure.value.reply.code, 451)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.queue_files(), {"tmp": [], "msg": [], "env": []})
