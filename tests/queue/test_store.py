"""QueueStore: ids, commit protocol, round trips, corrupt files, crash recovery, flush."""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue import locks as locks_module
from mailstack.queue.entry import DELIVERED, QueueEntry, RecipientState
from mailstack.queue.locks import entry_lock
from mailstack.queue.store import CorruptEntry, NoSuchEntry, QueueStore, Recovery
from mailstack.storage import fsutil
from tests.storage.faults import Faults, count_steps, scratch_path
from tests.storage.test_dirsync import WAIT, HeldFsyncs, Threads, instrumented

BODY = b"Received: by x; date\r\nSubject: hi\r\n\r\nbody\r\n" * 50


def listing(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def make_entry(queue_id: str, sender: str = "alice@example.net") -> QueueEntry:
    return QueueEntry(
        id=queue_id,
        sender=sender,
        arrival=1_000_000.5,
        recipients=[
            RecipientState(address="bob@example.org", original="Bob@example.org", local=True),
            RecipientState(address="Carol@remote.example", original="Carol@remote.example", local=False),
        ],
        size=len(BODY),
        user="alice@example.net",
        peer="192.0.2.1",
    )


class StoreTestMixin:
    def setUp(self) -> None:
        self.store = QueueStore(scratch_path(self))
        self.store.recover()

    def stage(self, body: bytes = BODY, store: QueueStore | None = None) -> QueueEntry:
        """Write a message to tmp/ as the intake does and return its entry."""
        store = store or self.store
        queue_id = store.new_id()
        with store.open_tmp(queue_id) as f:
            f.write(body)
        return make_entry(queue_id)

    def dirs(self, store: QueueStore | None = None) -> dict[str, list[str]]:
        store = store or self.store
        return {name: listing(os.path.join(store.root, name)) for name in ("tmp", "msg", "env", "corrupt")}


class IdTests(StoreTestMixin, SynchronousTestCase):
    def test_idsSortableAndUnique(self) -> None:
        """Ids are 24 lowercase hex digits, increase with time and never repeat."""
        ids = [self.store.new_id() for _ in range(200)]
        self.assertEqual(len(set(ids)), 200)
        for queue_id in ids:
            self.assertRegex(queue_id, r"\A[0-9a-f]{24}\Z")
        prefixes = [i[:14] for i in ids]
        self.assertEqual(prefixes, sorted(prefixes))

    def test_badIdNeverBecomesAPath(self) -> None:
        """Ids from outside (the admin command) are checked before any path is built."""
        for bad in ("../../etc/passwd", "", "ABC", "0" * 23, "0" * 24 + "/x"):
            self.assertRaises(NoSuchEntry, self.store.load, bad)
            self.assertRaises(NoSuchEntry, self.store.message_path, bad)
            self.assertRaises(NoSuchEntry, self.store.remove, bad)


class CommitTests(StoreTestMixin, SynchronousTestCase):
    def test_commitRoundTrip(self) -> None:
        """After commit the message is in msg/, the envelope in env/, and load returns it."""
        entry = self.stage()
        self.store.commit(entry)
        self.assertEqual(self.dirs()["tmp"], [])
        with open(self.store.message_path(entry.id), "rb") as f:
            self.assertEqual(f.read(), BODY)
        self.assertEqual(self.store.load(entry.id), entry)
        self.assertEqual(list(self.store.scan()), [entry])

    def test_envelopeIsVersionedUtf8Json(self) -> None:
        """The envelope file is UTF-8 JSON of QueueEntry.to_json() with a version field."""
        entry = self.stage()
        entry.sender = "jörg@exämple.net"
        self.store.commit(entry)
        with open(self.store.envelope_path(entry.id), "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        self.assertEqual(data["version"], 1)
        self.assertEqual(data, entry.to_json())

    def test_commitSteps(self) -> None:
        """fsync file, envelope tmp + fsync; then rename message, fsync msg/, rename envelope, fsync env/."""
        entry = self.stage()
        calls = count_steps(self, lambda: self.store.commit(entry))
        self.assertEqual(
            calls,
            ["_open", "_fsync", "_open", "_write", "_fsync"]  # prepare: message, envelope temporary
            + ["_rename", "_open", "_fsync"]  # publish: message, msg/
            + ["_rename", "_open", "_fsync"],  # envelope (the commit record), env/
        )

    def test_failureAtEveryCommitStepLeavesNothing(self) -> None:
        """An error at any commit step raises and leaves no file of that message at all."""
        staged = self.stage()
        steps = len(count_steps(self, lambda: self.store.commit(staged)))
        for k in range(1, steps + 1):
            store = QueueStore(scratch_path(self))
            store.recover()
            entry = self.stage(store=store)
            faults = Faults(self, fail_at=k)
            self.assertRaises(OSError, store.commit, entry)
            faults.restore()
            self.assertEqual(self.dirs(store), {"tmp": [], "msg": [], "env": [], "corrupt": []}, f"step {k}")
            self.assertEqual(list(store.scan()), [])

    def test_crashAtEveryCommitStepIsConsistentAfterRecover(self) -> None:
        """A crash at any commit step, then recover(): the message is absent, or queued once and whole."""
        staged = self.stage()
        steps = len(count_steps(self, lambda: self.store.commit(staged)))
        outcomes = set()
        for k in range(1, steps + 1):
            store = QueueStore(scratch_path(self))
            store.recover()
            entry = self.stage(store=store)
            faults = Faults(self, fail_at=k, crash=True)
            self.assertRaises(OSError, store.commit, entry)
            faults.restore()
            restarted = QueueStore(store.root)
            recovery = restarted.recover()
            self.assertEqual(recovery.corrupt, (), f"step {k}")
            entries = list(restarted.scan())
            dirs = self.dirs(restarted)
            self.assertEqual(dirs["tmp"], [], f"step {k}")
            self.assertEqual(dirs["corrupt"], [], f"step {k}")
            if entries:
                self.assertEqual(entries, [entry], f"step {k}")
                self.assertEqual(dirs["msg"], [entry.id])
                with open(restarted.message_path(entry.id), "rb") as f:
                    self.assertEqual(f.read(), BODY)
            else:
                self.assertEqual(dirs["msg"], [], f"step {k}")
                self.assertEqual(dirs["env"], [], f"step {k}")
            outcomes.add(len(entries))
        self.assertEqual(outcomes, {0, 1})

    def three_commits(
        self, fsync: HeldFsyncs, while_held: Callable[[Threads], None]
    ) -> tuple[list[QueueEntry], dict[str, BaseException | None]]:
        """Commit one message while ``fsync`` holds the first fsync of env/, two more
        meanwhile; ``while_held`` runs once both wait, then everything finishes.
        The entries, and what each commit raised (None: committed)."""
        self.store._syncs, condition = instrumented(fsync)
        entries = [make_entry(self.store.new_id()) for _ in range(3)]
        threads = Threads()
        threads.start("first", lambda: self.store.commit(entries[0], BODY))
        self.assertTrue(fsync.started.wait(WAIT))
        threads.start("second", lambda: self.store.commit(entries[1], BODY))
        threads.start("third", lambda: self.store.commit(entries[2], BODY))
        condition.until_waiting(2)
        while_held(threads)
        fsync.release()
        threads.join()
        return entries, threads.errors

    def test_commitsAtOnceShareDirectoryFsyncs(self) -> None:
        """Commits that renamed while an fsync of env/ ran share the next one: three commits, two fsyncs."""
        fsync = HeldFsyncs(hold=(os.path.join(self.store.root, "env"),))
        # No commit returns before an fsync that began after its rename.
        entries, errors = self.three_commits(fsync, lambda threads: self.assertEqual(threads.errors, {}))
        self.assertEqual(errors, {"first": None, "second": None, "third": None})
        self.assertEqual(fsync.calls, [os.path.join(self.store.root, "env")] * 2)
        self.assertEqual(list(self.store.scan()), entries)

    def test_failedSharedFsyncFailsEveryCommitWaitingForIt(self) -> None:
        """A failed fsync of env/ fails each commit that waited for it and leaves nothing of them."""
        fsync = HeldFsyncs(hold=(os.path.join(self.store.root, "env"),), fail={2: OSError(errno.EIO, "I/O error")})
        entries, errors = self.three_commits(fsync, lambda threads: None)
        self.assertIsNone(errors["first"])
        self.assertIsInstance(errors["second"], OSError)
        self.assertIsInstance(errors["third"], OSError)
        self.assertEqual(list(self.store.scan()), [entries[0]])
        self.assertEqual(self.dirs(), {"tmp": [], "msg": [], "env": [entries[0].id + ".json"], "corrupt": []})

    def test_removeWithoutSyncSkipsTheDirectoryFsync(self) -> None:
        """remove(sync=False) unlinks envelope then message and fsyncs nothing."""
        entry = self.stage()
        self.store.commit(entry)
        calls = count_steps(self, lambda: self.assertTrue(self.store.remove(entry.id, sync=False)))
        self.assertEqual(calls, ["_unlink", "_unlink"])
        self.assertEqual(list(self.store.scan()), [])

    def test_concurrentCommitsIndependent(self) -> None:
        """Staged messages commit in any order; each one only touches its own files."""
        entries = [self.stage(body=BODY + bytes([i])) for i in range(5)]
        for entry in reversed(entries):
            self.store.commit(entry)
        self.assertEqual([e.id for e in self.store.scan()], sorted(e.id for e in entries))

    def test_commitsFromManyThreads(self) -> None:
        """Commits running at once in a thread pool (as in production) all land, each whole."""
        entries = [self.stage(body=BODY + b"%d" % i) for i in range(24)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(self.store.commit, entries))
        self.assertEqual(list(self.store.scan()), sorted(entries, key=lambda e: e.id))
        for i, entry in enumerate(entries):
            with open(self.store.message_path(entry.id), "rb") as f:
                self.assertEqual(f.read(), BODY + b"%d" % i)


class SaveLoadRemoveTests(StoreTestMixin, SynchronousTestCase):
    def test_saveReplacesEnvelope(self) -> None:
        """save() durably replaces the envelope; load() sees the new state."""
        entry = self.stage()
        self.store.commit(entry)
        entry.recipients[0].status = DELIVERED
        entry.recipients[1].attempts = 3
        entry.recipients[1].last_reply = "451 4.7.1 greylisted"
        self.store.save(entry)
        self.assertEqual(self.store.load(entry.id), entry)
        self.assertEqual(self.dirs()["env"], [entry.id + ".json"])

    def test_saveKeepingTheHoldOnDisk(self) -> None:
        """save(keep_hold=True) keeps the hold of the envelope it replaces (set by the
        admin command meanwhile) and reads that envelope once."""
        entry = self.commit_inline_entry()
        held = QueueEntry.from_json(entry.to_json())
        held.held_since, held.held_time = 1_000_100.0, 3600.0
        self.store.save(held)
        entry.recipients[1].attempts = 2
        plain = count_steps(self, lambda: self.store.save(QueueEntry.from_json(held.to_json())))
        # The same steps as a plain save: one read of the envelope, the new one written and fsynced.
        self.assertEqual(count_steps(self, lambda: self.store.save(entry, keep_hold=True)), plain)
        loaded, message = self.store.load_message(entry.id)
        self.assertEqual((loaded.held_since, loaded.held_time, loaded.recipients[1].attempts), (1_000_100.0, 3600.0, 2))
        self.assertEqual(message, BODY)

    def test_saveKeepingTheHoldReplacesAnUnreadableEnvelope(self) -> None:
        """With keep_hold, an unreadable envelope is moved to corrupt/ and the entry's state replaces it."""
        entry = self.commit_inline_entry()
        with open(self.store.envelope_path(entry.id), "wb") as f:
            f.write(b"{damaged")
        self.store.save(entry, keep_hold=True)
        self.assertEqual(self.dirs()["corrupt"], [entry.id + ".json"])
        self.assertEqual(self.store.read_envelope(entry.id)[0][:1], b"{")
        self.assertEqual(json.loads(self.store.read_envelope(entry.id)[0])["id"], entry.id)

    def commit_inline_entry(self) -> QueueEntry:
        entry = make_entry(self.store.new_id())
        self.store.commit(entry, BODY)
        return entry

    def test_saveFailureKeepsOldEnvelope(self) -> None:
        """A save that fails before its rename leaves the previous envelope intact."""
        entry = self.stage()
        self.store.commit(entry)
        changed = make_entry(entry.id, sender="")
        for k in range(1, 5):
            faults = Faults(self, fail_at=k)
            self.assertRaises(OSError, self.store.save, changed)
            faults.restore()
            self.assertEqual(self.store.load(entry.id), entry)

    def test_removeEnvelopeFirst(self) -> None:
        """remove() drops the envelope (durably) before the message."""
        entry = self.stage()
        self.store.commit(entry)
        calls = count_steps(self, lambda: self.assertTrue(self.store.remove(entry.id)))
        self.assertEqual(calls, ["_unlink", "_open", "_fsync", "_unlink"])
        self.assertEqual(self.dirs(), {"tmp": [], "msg": [], "env": [], "corrupt": []})
        self.assertRaises(NoSuchEntry, self.store.load, entry.id)
        self.assertFalse(self.store.remove(entry.id))

    def test_crashDuringRemoveRecovers(self) -> None:
        """A crash after the envelope is gone leaves an orphan message that recover() deletes."""
        entry = self.stage()
        self.store.commit(entry)
        faults = Faults(self, fail_at=4, crash=True)
        self.assertRaises(OSError, self.store.remove, entry.id)
        faults.restore()
        self.assertEqual(self.dirs()["msg"], [entry.id])
        self.assertEqual(self.store.recover(), Recovery(orphans_removed=1))
        self.assertEqual(self.dirs(), {"tmp": [], "msg": [], "env": [], "corrupt": []})

    def test_loadMissing(self) -> None:
        """Loading an id that was never committed raises NoSuchEntry."""
        self.assertRaises(NoSuchEntry, self.store.load, self.store.new_id())

    def test_scanReadsNoMessage(self) -> None:
        """scan() opens envelopes only, never a message body."""
        for _ in range(3):
            self.store.commit(self.stage())
        opened = []
        real_open, real_os_open = open, fsutil._open

        def spy(path, *args, **kwargs):
            opened.append(str(path))
            return real_open(path, *args, **kwargs)

        def os_spy(path, *args, **kwargs):
            opened.append(str(path))
            return real_os_open(path, *args, **kwargs)

        self.patch(builtins, "open", spy)
        self.patch(fsutil, "_open", os_spy)
        self.assertEqual(len(list(self.store.scan())), 3)
        self.assertEqual(len(opened), 3)
        self.assertTrue(all(p.endswith(".json") for p in opened))

    def test_scanIgnoresTemporaries(self) -> None:
        """Envelope temporaries of an interrupted save are not entries."""
        entry = self.stage()
        self.store.commit(entry)
        with open(os.path.join(self.store.root, "env", f".tmp.{entry.id}.json.1.2"), "wb") as f:
            f.write(b"{")
        self.assertEqual(list(self.store.scan()), [entry])
        self.store.recover()
        self.assertEqual(self.dirs()["env"], [entry.id + ".json"])


class CorruptTests(StoreTestMixin, SynchronousTestCase):
    def write_envelope(self, queue_id: str, data: bytes) -> None:
        with open(self.store.envelope_path(queue_id), "wb") as f:
            f.write(data)

    def test_unreadableEnvelopesMovedToCorrupt(self) -> None:
        """Bad JSON, bad UTF-8, a wrong version, wrong fields or a wrong id go to corrupt/ with their message."""
        good = self.stage()
        self.store.commit(good)
        bad_documents = [
            b"{not json",
            b"\xff\xfe",
            json.dumps(dict(make_entry("0" * 24).to_json(), version=99)).encode(),
            json.dumps({"version": 1, "id": "x"}).encode(),
            json.dumps(make_entry("f" * 24).to_json()).encode(),  # names another id
            b"[1, 2]",
        ]
        bad_ids = []
        for data in bad_documents:
            entry = self.stage()
            self.store.commit(entry)
            self.write_envelope(entry.id, data)
            bad_ids.append(entry.id)
        self.assertEqual(list(self.store.scan()), [good])
        corrupt = self.dirs()["corrupt"]
        for queue_id in bad_ids:
            self.assertIn(queue_id + ".json", corrupt)
            self.assertIn(queue_id, corrupt)
        self.assertEqual(self.dirs()["msg"], [good.id])

    def test_loadCorrupt(self) -> None:
        """load() of an unreadable envelope raises CorruptEntry and moves it aside."""
        entry = self.stage()
        self.store.commit(entry)
        self.write_envelope(entry.id, b"")
        self.assertRaises(CorruptEntry, self.store.load, entry.id)
        self.assertRaises(NoSuchEntry, self.store.load, entry.id)
        self.assertEqual(self.dirs()["corrupt"], sorted([entry.id, entry.id + ".json"]))

    def test_envelopeWithoutMessageIsCorrupt(self) -> None:
        """recover() moves an envelope whose message is missing to corrupt/."""
        entry = self.stage()
        self.store.commit(entry)
        os.unlink(self.store.message_path(entry.id))
        self.assertEqual(self.store.recover(), Recovery(corrupt=(entry.id,)))
        self.assertEqual(self.dirs()["corrupt"], [entry.id + ".json"])
        self.assertEqual(list(self.store.scan()), [])


class RecoverTests(StoreTestMixin, SynchronousTestCase):
    def test_recoverCreatesLayout(self) -> None:
        """recover() on a new root creates tmp/, msg/, env/ and corrupt/."""
        store = QueueStore(scratch_path(self))
        self.assertEqual(store.recover(), Recovery())
        self.assertEqual(listing(store.root), ["corrupt", "env", "msg", "tmp"])

    def test_recoverEmptiesTmpAndDropsOrphans(self) -> None:
        """Messages being received and committed bytes without an envelope are removed; entries stay."""
        kept = self.stage()
        self.store.commit(kept)
        self.stage()  # in tmp/
        orphan = self.stage()
        os.rename(self.store.tmp_path(orphan.id), self.store.message_path(orphan.id))
        self.assertEqual(self.store.recover(), Recovery(tmp_removed=1, orphans_removed=1))
        self.assertEqual(self.dirs(), {"tmp": [], "msg": [kept.id], "env": [kept.id + ".json"], "corrupt": []})
        self.assertEqual(list(self.store.scan()), [kept])

    def test_scanEmptyStore(self) -> None:
        """A store that was never used scans as empty without creating anything."""
        store = QueueStore(scratch_path(self))
        self.assertEqual(list(store.scan()), [])
        self.assertFalse(os.path.exists(store.root))


class FlushTests(StoreTestMixin, SynchronousTestCase):
    def test_flushTriggerConsumedOnce(self) -> None:
        """A flush request is seen exactly once."""
        self.assertFalse(self.store.flush_requested())
        self.store.request_flush()
        self.store.request_flush()
        self.assertTrue(self.store.flush_requested())
        self.assertFalse(self.store.flush_requested())

    def test_flushFromAnotherStoreObject(self) -> None:
        """The admin command's store and the server's store share the trigger file."""
        QueueStore(self.store.root).request_flush()
        self.assertTrue(self.store.flush_requested())


class OpenTmpTests(StoreTestMixin, SynchronousTestCase):
    def test_openTmpExclusive(self) -> None:
        """open_tmp never reuses an existing file."""
        queue_id = self.store.new_id()
        self.store.open_tmp(queue_id).close()
        self.assertRaises(FileExistsError, self.store.open_tmp, queue_id)

    def test_openTmpCreatesDirectory(self) -> None:
        """open_tmp works on a store whose directories do not exist yet."""
        store = QueueStore(scratch_path(self))
        with store.open_tmp(store.new_id()) as f:
            f.write(b"x")
        self.assertEqual(len(listing(os.path.join(store.root, "tmp"))), 1)


class ImportTests(SynchronousTestCase):
    def test_noTwisted(self) -> None:
        """The store imports no Twisted module, so the admin command can use it without a reactor."""
        code = "import sys, mailstack.queue.store; print(sorted(m for m in sys.modules if m.startswith('twisted')))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), "[]")


class EncodingTests(StoreTestMixin, SynchronousTestCase):
    def test_envelopeEqualsToJson(self) -> None:
        """The fast envelope encoder writes exactly the JSON value of QueueEntry.to_json(), history included."""
        from mailstack.queue.store import _encode

        entry = make_entry(self.store.new_id())
        entry.recipients[0].history.append({"time": 1.5, "host": "mx[192.0.2.9]", "reply": "451 4.4.1 later"})
        entry.recipients[1].status = DELIVERED
        entry.delay_warned = True
        self.assertEqual(json.loads(_encode(entry).decode("utf-8")), entry.to_json())
        self.assertEqual(QueueEntry.from_json(json.loads(_encode(entry))), entry)


class SaveDurableTests(StoreTestMixin, SynchronousTestCase):
    def test_saveFsyncsEnvDirectory(self) -> None:
        """save() fsyncs env/ after the rename."""
        entry = self.stage()
        self.store.commit(entry)
        dirs: list[str] = []
        real_dir = fsutil.fsync_dir
        self.patch(fsutil, "fsync_dir", lambda p: (dirs.append(p), real_dir(p))[1])
        self.store.save(entry)
        self.assertEqual(dirs, [os.path.join(self.store.root, "env")])


class ListingOnlyRecoverTests(StoreTestMixin, SynchronousTestCase):
    def opened_envelopes(self, **kw) -> tuple[list[str], Recovery]:
        """Run recover(**kw), recording every envelope the store opens (it opens through fsutil._open)."""
        opened: list[str] = []
        real_open = fsutil._open
        self.patch(fsutil, "_open", lambda p, *a: (opened.append(str(p)), real_open(p, *a))[1])
        found = self.store.recover(**kw)
        return [p for p in opened if p.endswith(".json")], found

    def test_listingOnlyRecoverReadsNoEnvelope(self) -> None:
        """recover(read_envelopes=False) opens no envelope, yet cleans tmp/ and
        orphans like the full recover; an envelope with no message (in it or in
        msg/) and an unreadable one are moved aside when first read."""
        kept = self.stage()
        self.store.commit(kept)
        lonely = self.stage()
        self.store.commit(lonely)
        os.unlink(self.store.message_path(lonely.id))  # envelope without message
        orphan = self.stage()
        os.rename(self.store.tmp_path(orphan.id), self.store.message_path(orphan.id))  # message without envelope
        self.stage()  # left in tmp/
        bad = self.stage()
        self.store.commit(bad)
        with open(self.store.envelope_path(bad.id), "wb") as f:
            f.write(b"{not json")
        opened, found = self.opened_envelopes(read_envelopes=False)
        self.assertEqual(opened, [])
        self.assertEqual(found.tmp_removed, 1)
        self.assertEqual(found.orphans_removed, 1)
        self.assertEqual(found.corrupt, ())
        self.assertEqual(self.store.ids(), sorted([kept.id, lonely.id, bad.id]))
        self.assertRaises(CorruptEntry, self.store.load, bad.id)
        self.assertRaises(CorruptEntry, self.store.load, lonely.id)
        self.assertEqual(self.store.ids(), [kept.id])
        self.assertEqual(sorted(os.listdir(os.path.join(self.store.root, "corrupt"))),
                         sorted([bad.id, bad.id + ".json", lonely.id + ".json"]))
        self.assertEqual(self.store.load(kept.id).id, kept.id)

    def test_fullRecoverReadsEnvelopes(self) -> None:
        """The probe above can fail: the full recover() opens every envelope."""
        kept = self.stage()
        self.store.commit(kept)
        opened, _ = self.opened_envelopes()
        self.assertEqual(opened, [self.store.envelope_path(kept.id)])


class ReadEnvelopeTests(StoreTestMixin, SynchronousTestCase):
    def test_bytesAndMark(self) -> None:
        """read_envelope gives the envelope's bytes and the attempt mark; NoSuchEntry once removed."""
        entry = self.stage()
        self.store.commit(entry)
        data, mark = self.store.read_envelope(entry.id)
        self.assertEqual((json.loads(data)["id"], mark), (entry.id, 0.0))
        later = os.stat(self.store.envelope_path(entry.id)).st_ctime + 3600
        self.store.mark_attempt(entry.id, later)
        self.assertEqual(self.store.read_envelope(entry.id)[1], later)
        self.store.remove(entry.id)
        self.assertRaises(NoSuchEntry, self.store.read_envelope, entry.id)


class InlineMessageTests(StoreTestMixin, SynchronousTestCase):
    """A message given as bytes is stored inside its envelope: one file per entry."""

    def commit_inline(self, body: bytes = BODY) -> QueueEntry:
        entry = make_entry(self.store.new_id())
        self.store.commit(entry, body)
        return entry

    def test_oneFileAndRoundTrip(self) -> None:
        """The commit writes only env/<id>.json; load_message gives the entry and every byte back."""
        body = BODY + bytes(range(256))
        entry = self.commit_inline(body)
        self.assertEqual(self.dirs(), {"tmp": [], "msg": [], "env": [entry.id + ".json"], "corrupt": []})
        self.assertEqual(self.store.load_message(entry.id), (entry, body))
        self.assertEqual(self.store.load(entry.id), entry)
        self.assertEqual(self.store.read_message(entry.id), body)
        self.assertEqual(self.store.message_headers(entry.id), b"Received: by x; date\r\nSubject: hi\r\n")

    def test_fewerSteps(self) -> None:
        """One file created, fsynced and renamed, one directory fsync; no msg/ step."""
        entry = make_entry(self.store.new_id())
        steps = count_steps(self, lambda: self.store.commit(entry, BODY))
        self.assertEqual(steps, ["_open", "_write", "_fsync", "_rename", "_open", "_fsync"])

    def test_fileEntryHasNoInlineMessage(self) -> None:
        """A message streamed to tmp/ keeps its own file; load_message says so with None."""
        entry = self.stage()
        self.store.commit(entry)
        self.assertEqual(self.store.load_message(entry.id), (entry, None))
        self.assertEqual(self.store.read_message(entry.id), BODY)

    def test_saveCarriesTheMessageOver(self) -> None:
        """A new attempt state keeps the message inside the envelope."""
        entry = self.commit_inline()
        entry.recipients[1].attempts = 3
        self.store.save(entry)
        self.assertEqual(self.store.load_message(entry.id), (entry, BODY))

    def test_saveRefusesToDropAnUnreadableMessage(self) -> None:
        """If the envelope being replaced cannot be parsed, save raises instead of writing one without the
        message."""
        entry = self.commit_inline()
        with open(self.store.envelope_path(entry.id), "wb") as f:
            f.write(b"{damaged")
        self.assertRaises(ValueError, self.store.save, entry)
        with open(self.store.envelope_path(entry.id), "rb") as f:
            self.assertEqual(f.read(), b"{damaged")

    def test_removeWithoutMessageFile(self) -> None:
        """remove(message_file=False) unlinks the envelope only."""
        entry = self.commit_inline()
        steps = count_steps(self, lambda: self.assertTrue(self.store.remove(entry.id, sync=False, message_file=False)))
        self.assertEqual(steps, ["_unlink"])
        self.assertEqual(self.dirs(), {"tmp": [], "msg": [], "env": [], "corrupt": []})

    def test_recoverKeepsInlineEntries(self) -> None:
        """Both recovers keep an envelope that holds its message (it has no msg/<id>)."""
        entry = self.commit_inline()
        for read in (False, True):
            self.assertEqual(self.store.recover(read_envelopes=read).corrupt, ())
            self.assertEqual(self.store.load_message(entry.id)[1], BODY)

    def test_damagedMessageIsCorrupt(self) -> None:
        """A message value that is not a Latin-1 string makes the envelope unreadable (moved aside)."""
        entry = self.commit_inline()
        with open(self.store.envelope_path(entry.id), "rb") as f:
            data = json.loads(f.read())
        data["message"] = "\u20ac"
        with open(self.store.envelope_path(entry.id), "w") as f:
            json.dump(data, f)
        self.assertRaises(CorruptEntry, self.store.load_message, entry.id)
        self.assertEqual(self.dirs()["corrupt"], [entry.id + ".json"])

    def test_failureAtEveryStepLeavesNothing(self) -> None:
        """An error at any step of an inline commit raises and leaves no file of it."""
        steps = len(count_steps(self, lambda: self.store.commit(make_entry(self.store.new_id()), BODY)))
        for k in range(1, steps + 1):
            store = QueueStore(scratch_path(self))
            store.recover()
            faults = Faults(self, fail_at=k)
            self.assertRaises(OSError, store.commit, make_entry(store.new_id()), BODY)
            faults.restore()
            self.assertEqual(self.dirs(store), {"tmp": [], "msg": [], "env": [], "corrupt": []}, f"step {k}")


class EntryLockTests(StoreTestMixin, SynchronousTestCase):
    """entry_lock on an entry whose message is inside its envelope locks the envelope."""

    def test_presentAndGone(self) -> None:
        """The lock says present for a committed inline entry and absent once it is removed."""
        entry = make_entry(self.store.new_id())
        self.store.commit(entry, BODY)
        with entry_lock(self.store, entry.id) as present:
            self.assertTrue(present)
        self.store.remove(entry.id)
        with entry_lock(self.store, entry.id) as present:
            self.assertFalse(present)

    def test_envelopeReplacedWhileLocking(self) -> None:
        """An envelope replaced between the open and the lock is locked again, on the new file."""
        entry = make_entry(self.store.new_id())
        self.store.commit(entry, BODY)
        locked: list[int] = []
        real = locks_module.fcntl.flock

        def flock(fd: int, op: int) -> None:
            if not locked:
                self.store.save(entry)  # another process saves first
            locked.append(os.fstat(fd).st_ino)
            real(fd, op)

        self.patch(locks_module.fcntl, "flock", flock)
        with entry_lock(self.store, entry.id) as present:
            self.assertTrue(present)
        self.assertEqual(len(locked), 2)
        self.assertEqual(locked[1], os.stat(self.store.envelope_path(entry.id)).st_ino)

    def test_removedWhileLocking(self) -> None:
        """An envelope removed between the open and the lock: not present."""
        entry = make_entry(self.store.new_id())
        self.store.commit(entry, BODY)
        real = locks_module.fcntl.flock

        def flock(fd: int, op: int) -> None:
            self.store.remove(entry.id)
            real(fd, op)

        self.patch(locks_module.fcntl, "flock", flock)
        with entry_lock(self.store, entry.id) as present:
            self.assertFalse(present)
