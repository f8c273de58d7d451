"""LocalAgent: queued message into each local recipient's Maildir, one reply each."""

from __future__ import annotations

import errno
import mailbox
import os

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.delivery.local import LocalAgent
from mailstack.errors import Reply
from mailstack.interfaces import IDeliveryAgent, IDirectDelivery, IMaildirStore
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.queue.store import QueueStore
from mailstack.storage.maildir import MaildirStore
from tests.storage.faults import Faults, scratch_path

MESSAGE = b"Received: by mx.example.org; Fri, 28 Nov 2025 14:52:35 +0000\r\nSubject: hi\r\n\r\n\xe9\r\n" * 3000


def run_blocking(f, *args, **kwargs):
    return maybeDeferred(f, *args, **kwargs)


def rcpt(address: str) -> RecipientState:
    return RecipientState(address=address, original=address, local=True)


class LocalAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = scratch_path(self)
        self.store = QueueStore(os.path.join(base, "queue"))
        self.store.recover()
        self.maildirs = MaildirStore(os.path.join(base, "mail"), hostname="mx.example.org")
        self.agent = LocalAgent(self.maildirs, self.store, run_blocking)
        self.entry = self.queue(sender="alice@example.net")

    def queue(self, sender: str) -> QueueEntry:
        queue_id = self.store.new_id()
        with self.store.open_tmp(queue_id) as f:
            f.write(MESSAGE)
        entry = QueueEntry(
            id=queue_id,
            sender=sender,
            arrival=0.0,
            recipients=[rcpt("bob@example.org"), rcpt("carol@example.org")],
            size=len(MESSAGE),
        )
        self.store.commit(entry)
        return entry

    def messages(self, address: str) -> list[bytes]:
        new = os.path.join(self.maildirs.path_for(address), "new")
        out = []
        for name in sorted(os.listdir(new)) if os.path.isdir(new) else []:
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def test_interface(self) -> None:
        """LocalAgent provides IDeliveryAgent and IDirectDelivery; MaildirStore provides IMaildirStore."""
        verifyObject(IDeliveryAgent, self.agent)
        verifyObject(IDirectDelivery, self.agent)
        verifyObject(IMaildirStore, self.agent._maildirs)

    def test_deliversEachRecipient(self) -> None:
        """Each recipient gets Return-Path:, Delivered-To: and the queued bytes unchanged; 250 2.0.0."""
        result = self.successResultOf(self.agent.deliver(self.entry, self.entry.recipients))
        self.assertEqual({a: (r.code, r.enhanced) for a, r in result.items()},
                         {"bob@example.org": (250, "2.0.0"), "carol@example.org": (250, "2.0.0")})
        for address in ("bob@example.org", "carol@example.org"):
            prefix = f"Return-Path: <alice@example.net>\r\nDelivered-To: {address}\r\n".encode()
            self.assertEqual(self.messages(address), [prefix + MESSAGE])

    def test_nullSenderReturnPath(self) -> None:
        """A bounce (sender <>) gets Return-Path: <> (RFC 5321 section 4.4)."""
        entry = self.queue(sender="")
        self.successResultOf(self.agent.deliver(entry, entry.recipients[:1]))
        self.assertTrue(self.messages("bob@example.org")[0].startswith(b"Return-Path: <>\r\n"))

    def test_stdlibMaildirReadsDelivery(self) -> None:
        """Python's mailbox.Maildir reads the delivered message and its added headers."""
        self.successResultOf(self.agent.deliver(self.entry, self.entry.recipients[:1]))
        box = mailbox.Maildir(self.maildirs.path_for("bob@example.org"), factory=None, create=False)
        (message,) = list(box)
        self.assertEqual(message["Return-Path"], "<alice@example.net>")
        self.assertEqual(message["Delivered-To"], "bob@example.org")
        self.assertEqual(message["Subject"], "hi")

    def test_oneBlockingCallPerRecipient(self) -> None:
        """Recipients are written in parallel: one run_blocking call each, answered in any order."""
        calls: list[tuple[tuple, Deferred]] = []

        def deferred_blocking(f, *args):
            d = Deferred()
            calls.append(((f, args), d))
            return d

        agent = LocalAgent(self.maildirs, self.store, deferred_blocking)
        result = agent.deliver(self.entry, self.entry.recipients)
        self.assertEqual(len(calls), 2)
        self.assertNoResult(result)
        for (f, args), d in reversed(calls):
            d.callback(f(*args))
        self.assertEqual(set(self.successResultOf(result)), {"bob@example.org", "carol@example.org"})

    def test_diskFull(self) -> None:
        """ENOSPC in a Maildir write gives 452 4.2.2 for that recipient (retried, not bounced)."""
        Faults(self, fail_at=1, error=errno.ENOSPC, crash=True)
        result = self.successResultOf(self.agent.deliver(self.entry, self.entry.recipients))
        self.assertEqual({(r.code, r.enhanced) for r in result.values()}, {(452, "4.2.2")})

    def test_ioError(self) -> None:
        """Other I/O errors give 451 4.3.0; the reply text carries no path or errno text."""
        Faults(self, fail_at=1, crash=True)
        result = self.successResultOf(self.agent.deliver(self.entry, self.entry.recipients))
        for reply in result.values():
            self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
            self.assertNotIn("/", reply.text)
            self.assertNotIn("Input/output", reply.text)

    def test_oneFailureDoesNotStopOthers(self) -> None:
        """A failure for one recipient leaves the other delivered."""
        real = self.maildirs.deliver

        def flaky(address, source, prefix=b""):
            if address == "bob@example.org":
                raise OSError(errno.EIO, "I/O error")
            return real(address, source, prefix)

        self.patch(self.maildirs, "deliver", flaky)
        result = self.successResultOf(self.agent.deliver(self.entry, self.entry.recipients))
        self.assertEqual(result["bob@example.org"].code, 451)
        self.assertEqual(result["carol@example.org"].code, 250)
        self.assertEqual(len(self.messages("carol@example.org")), 1)

    def test_missingQueuedMessageIsTemporary(self) -> None:
        """If the queued bytes are gone the reply is 4xx and nothing is delivered."""
        os.unlink(self.store.message_path(self.entry.id))
        result = self.successResultOf(self.agent.deliver(self.entry, self.entry.recipients[:1]))
        self.assertEqual(result["bob@example.org"].code, 451)
        self.assertEqual(self.messages("bob@example.org"), [])

    def test_unusableMailboxNameIsPermanent(self) -> None:
        """A recipient that cannot name a Maildir fails for good with 550 5.1.3."""
        entry = self.entry
        result = self.successResultOf(self.agent.deliver(entry, [rcpt('"a b"@example.org')]))
        self.assertEqual(result['"a b"@example.org'], Reply(550, "5.1.3", "Bad destination mailbox address"))

    def test_unexpectedErrorNeverErrbacks(self) -> None:
        """A bug in one delivery is logged and answered 451; deliver() still succeeds."""

        def broken(address, source, prefix=b""):
            raise RuntimeError("bug")

        self.patch(self.maildirs, "deliver", broken)
        result = self.successResultOf(self.agent.deliver(self.entry, self.entry.recipients[:1]))
        self.assertEqual(result["bob@example.org"].code, 451)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_logEventPerDelivery(self) -> None:
        """Each delivery logs queue_id, recipient and reply."""
        with capturedLogs() as events:
            self.successResultOf(self.agent.deliver(self.entry, self.entry.recipients))
        logged = [(e["queue_id"], e["recipient"], e["reply"]) for e in events if "reply" in e]
        self.assertEqual(
            sorted(logged),
            [
                (self.entry.id, "bob@example.org", "250 2.0.0 Delivered"),
                (self.entry.id, "carol@example.org", "250 2.0.0 Delivered"),
            ],
        )
