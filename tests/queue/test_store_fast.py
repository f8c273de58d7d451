"""QueueStore additions for the queue manager: save fsyncs env/,
recover() that only lists directories."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue.store import CorruptEntry
from mailstack.storage import fsutil
from tests.queue.test_store import StoreTestMixin


class SaveTests(StoreTestMixin, SynchronousTestCase):
    def test_save_durable_by_default(self) -> None:
        """save() still fsyncs env/ after the rename."""
        entry = self.stage()
        self.store.commit(entry)
        dirs: list[str] = []
        real_dir = fsutil.fsync_dir
        self.patch(fsutil, "fsync_dir", lambda p: (dirs.append(p), real_dir(p))[1])
        self.store.save(entry)
        self.assertEqual(dirs, [os.path.join(self.store.root, "env")])


class RecoverListingOnlyTests(StoreTestMixin, SynchronousTestCase):
    def test_listing_only_recover_reads_no_envelope(self) -> None:
        """recover(read_envelopes=False) opens no envelope, yet cleans tmp/,
        orphans and envelopes without a message like the full recover."""
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
        opened: list[str] = []
        import builtins

        real_open = builtins.open
        self.patch(builtins, "open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
        found = self.store.recover(read_envelopes=False)
        self.assertEqual([p for p in opened if p.endswith(".json")], [])
        self.assertEqual(found.tmp_removed, 1)
        self.assertEqual(found.orphans_removed, 1)
        self.assertEqual(found.corrupt, (lonely.id,))
        self.assertEqual(self.store.ids(), sorted([kept.id, bad.id]))
        # The unreadable envelope is moved aside when it is first read.
        self.assertRaises(CorruptEntry, self.store.load, bad.id)
        self.assertEqual(self.store.ids(), [kept.id])
        self.assertEqual(self.store.load(kept.id).id, kept.id)
