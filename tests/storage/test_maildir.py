"""MaildirStore: paths, unique names, streaming, crash safety, readability by others."""

from __future__ import annotations

import errno
import mailbox
import os
import re
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import Address, AddressError, parse_address
from mailstack.storage import maildir as maildir_module
from mailstack.storage.maildir import CHUNK, MaildirStore, escape_host, wire_size_of
from tests.storage.faults import Faults, count_steps, scratch_path
from tests.storage.test_dirsync import WAIT, HeldFsyncs, Threads, instrumented

BOB = parse_address("Bob@example.org")
MESSAGE = b"Subject: hello\r\n\r\nline one\r\n.dot line\r\n\xe9 8-bit\r\n"
NAME = re.compile(r"(\d+)\.M(\d+)P(\d+)Q(\d+)\.(.+),S=(\d+),W=(\d+)\Z")


def listing(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


class PathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MaildirStore(scratch_path(self), hostname="mx.example.org")

    def test_pathForUsesKeyForm(self) -> None:
        """The Maildir is root/<domain>/<lowercase local part>."""
        self.assertEqual(self.store.path_for(BOB), os.path.join(self.store.root, "example.org", "bob"))

    def test_pathForAcceptsString(self) -> None:
        """A "local@domain" string names the same Maildir as its Address."""
        self.assertEqual(self.store.path_for("bob@example.org"), self.store.path_for(BOB))

    def test_pathForRefusesUnsafe(self) -> None:
        """Local parts that are not safe path components never become paths."""
        for address in (Address("..", "example.org"), Address("a/b", "example.org"), Address("x", "[192.0.2.1]")):
            self.assertRaises(AddressError, self.store.path_for, address)

    def test_escapeHost(self) -> None:
        """'/' and ':' in the host name are escaped as the Maildir spec says."""
        self.assertEqual(escape_host("a/b:c"), "a\\057b\\072c")


class DeliverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = 1764341555.123456
        self.store = MaildirStore(scratch_path(self), hostname="mx.example.org", clock=lambda: self.now)
        self.maildir = self.store.path_for(BOB)

    def delivered(self) -> list[bytes]:
        new = os.path.join(self.maildir, "new")
        out = []
        for name in listing(new):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def test_createsMaildirOnFirstDelivery(self) -> None:
        """tmp/, new/ and cur/ exist after the first delivery; the message is in new/."""
        self.store.deliver(BOB, [MESSAGE])
        self.assertEqual(listing(self.maildir), ["cur", "new", "tmp"])
        self.assertEqual(self.delivered(), [MESSAGE])
        self.assertEqual(listing(os.path.join(self.maildir, "tmp")), [])

    def test_uniqueNameFormat(self) -> None:
        """<sec>.M<usec>P<pid>Q<seq>.<host>,S=<size>,W=<wire size>: S is the exact
        file size, W the size with CRLF line ends (the same for CRLF mail)."""
        name = self.store.deliver(BOB, [MESSAGE], prefix=b"X: y\r\n")
        m = NAME.match(name)
        self.assertIsNotNone(m, name)
        sec, usec, pid, seq, host, size, wire = m.groups()
        self.assertEqual((sec, usec, pid, host), ("1764341555", "123456", str(os.getpid()), "mx.example.org"))
        path = os.path.join(self.maildir, "new", name)
        self.assertEqual(int(size), os.path.getsize(path))
        with open(path, "rb") as f:
            self.assertEqual(int(wire), wire_size_of([f.read()]))

    def test_wireSizeCountsBareLineEnds(self) -> None:
        """W counts a CR for each bare LF and a final CRLF when missing, as POP3 sends it."""
        name = self.store.deliver(BOB, [b"a\nb\r", b"\nc"])
        size, wire = NAME.match(name).groups()[5:]
        self.assertEqual((int(size), int(wire)), (6, 9))

    def test_pidReadAtCallTime(self) -> None:
        """The pid comes from each call, so names stay right after twistd forks."""
        self.patch(maildir_module.os, "getpid", lambda: 4242)
        self.assertIn("P4242Q", self.store.deliver(BOB, [MESSAGE]))

    def test_namesUniqueWhenClockStands(self) -> None:
        """Two deliveries in the same microsecond get different names (sequence number)."""
        names = {self.store.deliver(BOB, [MESSAGE]) for _ in range(3)}
        self.assertEqual(len(names), 3)
        self.assertEqual(len(self.delivered()), 3)

    def test_namesUniqueAcrossStores(self) -> None:
        """Two stores in one process never produce the same name (the sequence is process-wide)."""
        other = MaildirStore(self.store.root, hostname="mx.example.org", clock=lambda: self.now)
        self.assertNotEqual(self.store.unique_name(), other.unique_name())

    def test_prefixThenSource(self) -> None:
        """The prefix comes first, then the source bytes unchanged (8-bit included)."""
        self.store.deliver(BOB, [MESSAGE[:10], MESSAGE[10:]], prefix=b"Return-Path: <a@b>\r\n")
        self.assertEqual(self.delivered(), [b"Return-Path: <a@b>\r\n" + MESSAGE])

    def test_sourceBytes(self) -> None:
        """A bytes source is one chunk, not an iterable of ints."""
        self.store.deliver(BOB, MESSAGE)
        self.assertEqual(self.delivered(), [MESSAGE])

    def test_sourcePathStreamedInChunks(self) -> None:
        """A file source is copied in CHUNK-sized writes, never read whole."""
        source = scratch_path(self)
        body = os.urandom(CHUNK * 3 + 17)
        with open(source, "wb") as f:
            f.write(body)
        faults = Faults(self)
        self.store.deliver(BOB, source)
        self.assertEqual(self.delivered(), [body])
        self.assertEqual(faults.calls.count("_write"), 4)

    def test_concurrentFirstDeliveries(self) -> None:
        """Threads delivering at once to a new Maildir all succeed with distinct names."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            names = list(pool.map(lambda i: self.store.deliver(BOB, [MESSAGE, b"%d" % i]), range(32)))
        self.assertEqual(len(set(names)), 32)
        self.assertEqual(sorted(self.delivered()), sorted(MESSAGE + b"%d" % i for i in range(32)))

    def test_pythonMailboxReadsIt(self) -> None:
        """The stdlib mailbox.Maildir lists and parses what we wrote."""
        self.store.deliver(BOB, [MESSAGE], prefix=b"Delivered-To: bob@example.org\r\n")
        box = mailbox.Maildir(self.maildir, factory=None, create=False)
        messages = list(box)
        self.assertEqual(len(messages), 1)
        self.assertEqual(messages[0]["Subject"], "hello")
        self.assertEqual(messages[0]["Delivered-To"], "bob@example.org")

    def test_durabilitySteps(self) -> None:
        """The file is fsynced before the rename and new/ is fsynced after it."""
        self.store.deliver(BOB, [MESSAGE])  # the Maildir exists: only message steps remain
        calls = count_steps(self, lambda: self.store.deliver(BOB, [MESSAGE]))
        self.assertEqual(calls, ["_open", "_write", "_fsync", "_rename", "_open", "_fsync"])

    def test_failureAtEveryStepLeavesNothing(self) -> None:
        """An error at any step of a first delivery raises and leaves no message anywhere."""
        steps = len(count_steps(self, lambda: MaildirStore(scratch_path(self)).deliver(BOB, [MESSAGE, MESSAGE])))
        self.assertGreater(steps, 6)
        for k in range(1, steps + 1):
            store = MaildirStore(scratch_path(self))
            faults = Faults(self, fail_at=k)
            self.assertRaises(OSError, store.deliver, BOB, [MESSAGE, MESSAGE])
            faults.restore()
            path = store.path_for(BOB)
            self.assertEqual(listing(os.path.join(path, "new")), [], f"step {k}")
            self.assertEqual(listing(os.path.join(path, "tmp")), [], f"step {k}")
            # The Maildir still works afterwards.
            store.deliver(BOB, [MESSAGE])
            self.assertEqual(len(listing(os.path.join(path, "new"))), 1)

    def test_crashAtEveryStepNeverLeavesPartialMessage(self) -> None:
        """A crash at any step leaves new/ with no message or one complete message."""
        payload = [MESSAGE] * 3
        whole = b"P: 1\r\n" + b"".join(payload)
        steps = len(count_steps(self, lambda: MaildirStore(scratch_path(self)).deliver(BOB, payload, b"P: 1\r\n")))
        outcomes = set()
        for k in range(1, steps + 1):
            store = MaildirStore(scratch_path(self))
            faults = Faults(self, fail_at=k, crash=True)
            self.assertRaises(OSError, store.deliver, BOB, payload, b"P: 1\r\n")
            faults.restore()
            new = os.path.join(store.path_for(BOB), "new")
            names = listing(new)
            self.assertLessEqual(len(names), 1, f"step {k}")
            for name in names:
                with open(os.path.join(new, name), "rb") as f:
                    self.assertEqual(f.read(), whole, f"step {k}")
            outcomes.add(len(names))
        self.assertEqual(outcomes, {0, 1})  # the last step (fsync new/) crashes after the rename

    def test_diskFullPropagates(self) -> None:
        """ENOSPC reaches the caller as an OSError with that errno."""
        self.store.deliver(BOB, [MESSAGE])
        Faults(self, fail_at=2, error=errno.ENOSPC)
        e = self.assertRaises(OSError, self.store.deliver, BOB, [MESSAGE])
        self.assertEqual(e.errno, errno.ENOSPC)


class BatchTests(SynchronousTestCase):
    """prepare() per message, publish() per batch: one fsync per new/ folder."""

    def setUp(self) -> None:
        self.store = MaildirStore(scratch_path(self), hostname="mx.example.org")
        self.carol = parse_address("carol@example.org")

    def new(self, address: Address) -> list[str]:
        return listing(os.path.join(self.store.path_for(address), "new"))

    def test_preparedIsInvisibleUntilPublished(self) -> None:
        """A prepared message sits fsynced in tmp/; readers see nothing in new/ until publish."""
        pending = self.store.prepare(BOB, [MESSAGE])
        self.assertEqual(self.new(BOB), [])
        self.assertEqual(listing(os.path.join(self.store.path_for(BOB), "tmp")), [pending.name.split(",S=")[0]])
        self.assertEqual(self.store.publish([pending]), [None])
        self.assertEqual(self.new(BOB), [pending.name])
        self.assertEqual(listing(os.path.join(self.store.path_for(BOB), "tmp")), [])

    def test_oneFsyncPerFolder(self) -> None:
        """Five messages for two mailboxes: five renames, two directory fsyncs."""
        self.store.deliver(BOB, [MESSAGE])
        self.store.deliver(self.carol, [MESSAGE])
        pending = [self.store.prepare(BOB if i % 2 else self.carol, [MESSAGE]) for i in range(5)]
        calls = count_steps(self, lambda: self.assertEqual(self.store.publish(pending), [None] * 5))
        self.assertEqual(calls, ["_rename"] * 5 + ["_open", "_fsync"] * 2)
        self.assertEqual(len(self.new(BOB)), 3)
        self.assertEqual(len(self.new(self.carol)), 4)

    def test_renameFailureFailsThatMessageOnly(self) -> None:
        """A failed rename fails one message (its tmp file removed); the others are delivered."""
        pending = [self.store.prepare(BOB, [MESSAGE]) for _ in range(3)]
        Faults(self, fail_at=2)
        errors = self.store.publish(pending)
        self.assertIsNone(errors[0])
        self.assertIsInstance(errors[1], OSError)
        self.assertIsNone(errors[2])
        self.assertEqual(self.new(BOB), sorted([pending[0].name, pending[2].name]))
        self.assertEqual(listing(os.path.join(self.store.path_for(BOB), "tmp")), [])

    def test_folderFsyncFailureTakesBackThatFolderOnly(self) -> None:
        """A failed fsync of one new/ fails (and removes) that folder's messages; others stay delivered."""
        pending = [self.store.prepare(BOB, [MESSAGE]), self.store.prepare(self.carol, [MESSAGE])]
        faults = Faults(self, fail_at=4)  # rename, rename, open new/ (bob), fsync new/ (bob)
        errors = self.store.publish(pending)
        self.assertEqual(faults.calls[3], "_fsync")
        self.assertIsInstance(errors[0], OSError)
        self.assertIsNone(errors[1])
        self.assertEqual(self.new(BOB), [])
        self.assertEqual(self.new(self.carol), [pending[1].name])

    def test_publishersAtOnceShareTheFolderFsync(self) -> None:
        """Threads that publish into one new/ while its fsync runs share the next one: three copies, two fsyncs."""
        new_dir = os.path.join(self.store.path_for(BOB), "new")
        pending = [self.store.prepare(BOB, [MESSAGE]) for _ in range(3)]
        fsync = HeldFsyncs(hold=(new_dir,))
        self.store._syncs, condition = instrumented(fsync)
        threads = Threads()
        threads.start("first", lambda: self.assertEqual(self.store.publish(pending[:1]), [None]))
        self.assertTrue(fsync.started.wait(WAIT))
        threads.start("second", lambda: self.assertEqual(self.store.publish(pending[1:2]), [None]))
        threads.start("third", lambda: self.assertEqual(self.store.publish(pending[2:]), [None]))
        condition.until_waiting(2)
        fsync.release()
        threads.join()
        self.assertEqual(threads.errors, {"first": None, "second": None, "third": None})
        self.assertEqual(fsync.calls, [new_dir, new_dir])
        self.assertEqual(self.new(BOB), sorted(p.name for p in pending))

    def test_discardRemovesPrepared(self) -> None:
        """discard() drops a prepared message without a trace."""
        pending = self.store.prepare(BOB, [MESSAGE])
        self.store.discard(pending)
        self.assertEqual(listing(os.path.join(self.store.path_for(BOB), "tmp")), [])
        self.assertEqual(self.new(BOB), [])

    def test_maildirRemovedBehindOurBackIsRecreated(self) -> None:
        """A Maildir deleted while the store remembers it is created again on the next delivery."""
        import shutil

        self.store.deliver(BOB, [MESSAGE])
        shutil.rmtree(self.store.path_for(BOB))
        self.store.deliver(BOB, [MESSAGE])
        self.assertEqual(len(self.new(BOB)), 1)
