"""Leftovers of crashed deliveries in a Maildir's tmp/ (pop3/mailbox.py).

A deliverer killed between writing ``tmp/<name>`` and publishing it leaves the
file there (tests/e2e/test_crash.py leaves a dozen per run).  The Maildir spec
asks readers to delete tmp/ files older than 36 hours; without that they pile
up forever.  The POP3 maildrop does it when it lists the mailbox.
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import SynchronousTestCase

from mailstack.pop3.mailbox import Maildrop
from tests.support.dirs import scratch_dir


class TmpLeftoverTests(SynchronousTestCase):
    def test_oldTmpFilesRemovedAtLogin(self) -> None:
        """Files in tmp/ older than 36 h go at login; younger ones (a delivery in progress) and the
        messages in new/ and cur/ stay."""
        root = scratch_dir(self, "mailstack-tmpclean-")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, sub))
        old = os.path.join(root, "tmp", "1000.M1P1Q1.crashed")
        fresh = os.path.join(root, "tmp", "2000.M1P1Q2.writing")
        for path in (old, fresh):
            with open(path, "wb") as f:
                f.write(b"Subject: x\r\n\r\nx\r\n")
        two_days_ago = time.time() - 48 * 3600
        os.utime(old, (two_days_ago, two_days_ago))
        with open(os.path.join(root, "new", "3000.M1P1Q3.host,S=10"), "wb") as f:
            f.write(b"Subject: y\r\n\r\ny\r\n")
        drop = Maildrop.open(root)
        try:
            self.assertEqual(len(drop.messages) if hasattr(drop, "messages") else len(drop.uniques), 1)
        finally:
            drop.close()
        self.assertFalse(os.path.exists(old))
        self.assertTrue(os.path.exists(fresh))
