"""``mailstack user del`` moves the Maildir aside; ``check-config`` warns about a missing postmaster."""

import io
import os
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from mailstack.admin import cli
from mailstack.storage import fsutil
from mailstack.storage.maildir import MaildirStore


class AdminTestCase(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cfg = os.path.join(self.dir, "m.toml")
        with open(self.cfg, "w") as f:
            f.write('data_dir = "data"\n[domains]\nlocal = ["localhost", "example.org"]\n')
        self.mail = os.path.join(self.dir, "data", "mail")

    def run_cli(self, *argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--config", self.cfg, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err, environ={})
        return status, out.getvalue(), err.getvalue()


class UserDelTests(AdminTestCase):
    def test_recreatedAddressStartsEmpty(self):
        """After del and add again, the new user's Maildir is empty; the old mail is under mail/.deleted/."""
        self.run_cli("user", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
        MaildirStore(self.mail, hostname="h").deliver("bob@example.org", [b"Subject: secret\r\n\r\nold mail\r\n"])
        with mock.patch("time.time", return_value=1_767_225_600.0):  # 2026-01-01 00:00:00 UTC
            status, out, _ = self.run_cli("user", "del", "bob@example.org")
        self.assertEqual(status, 0)
        kept = os.path.join(self.mail, ".deleted", "example.org", "bob-20260101T000000Z")
        self.assertIn(kept, out)
        self.assertEqual(len(os.listdir(os.path.join(kept, "new"))), 1)
        self.assertFalse(os.path.exists(os.path.join(self.mail, "example.org", "bob")))

        self.run_cli("user", "add", "bob@example.org", "--password-stdin", stdin="pw2\n")
        self.assertFalse(os.path.exists(os.path.join(self.mail, "example.org", "bob")))
        MaildirStore(self.mail, hostname="h").deliver("bob@example.org", [b"Subject: new\r\n\r\nnew\r\n"])
        self.assertEqual(len(os.listdir(os.path.join(self.mail, "example.org", "bob", "new"))), 1)

    def test_runningServerRecreatesMovedMaildir(self):
        """A store that already delivered to the user (as a running server has) delivers into a
        fresh Maildir after the deletion, not into the moved one."""
        store = MaildirStore(self.mail, hostname="h")
        self.run_cli("user", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
        store.deliver("bob@example.org", [b"old\r\n"])
        self.run_cli("user", "del", "bob@example.org")
        self.run_cli("user", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
        store.deliver("bob@example.org", [b"new\r\n"])
        (name,) = os.listdir(os.path.join(self.mail, "example.org", "bob", "new"))
        with open(os.path.join(self.mail, "example.org", "bob", "new", name), "rb") as f:
            self.assertEqual(f.read(), b"new\r\n")

    def test_renameDurable(self):
        """The move is a rename followed by an fsync of the old and the new parent directory."""
        self.run_cli("user", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
        MaildirStore(self.mail, hostname="h").deliver("bob@example.org", [b"x\r\n"])
        with mock.patch.object(fsutil, "fsync_dir", wraps=fsutil.fsync_dir) as synced:
            self.run_cli("user", "del", "bob@example.org")
        paths = [c.args[0] for c in synced.call_args_list]
        self.assertIn(os.path.join(self.mail, "example.org"), paths[-2:])
        self.assertIn(os.path.join(self.mail, ".deleted", "example.org"), paths[-2:])

    def test_deletedTwiceInOneSecond(self):
        """Two deletions of the same address within a second keep both Maildirs."""
        for _ in range(2):
            self.run_cli("user", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
            MaildirStore(self.mail, hostname="h").deliver("bob@example.org", [b"x\r\n"])
            with mock.patch("time.time", return_value=1_767_225_600.0):
                self.assertEqual(self.run_cli("user", "del", "bob@example.org")[0], 0)
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.mail, ".deleted", "example.org"))),
            ["bob-20260101T000000Z", "bob-20260101T000000Z-2"],
        )

    def test_userWithoutMaildir(self):
        """A user who never received mail is deleted without a moved folder."""
        self.run_cli("user", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
        status, out, _ = self.run_cli("user", "del", "bob@example.org")
        self.assertEqual((status, out.strip()), (0, "deleted bob@example.org"))
        self.assertFalse(os.path.exists(os.path.join(self.mail, ".deleted")))


class CheckConfigPostmasterTests(AdminTestCase):
    def test_warnsPerDomainWithoutPostmaster(self):
        """check-config exits 0 but warns for each local domain with no postmaster alias or user."""
        self.run_cli("alias", "add", "postmaster@localhost", "root@localhost")
        status, out, _ = self.run_cli("check-config")
        self.assertEqual(status, 0)
        warnings = [line for line in out.splitlines() if line.startswith("warning:")]
        self.assertEqual(len(warnings), 1, out)
        self.assertIn("postmaster@example.org", warnings[0])
        self.assertIn(os.path.join(self.mail, "example.org", "postmaster"), warnings[0])

    def test_postmasterUserSilencesWarning(self):
        """A postmaster user counts as well as an alias."""
        self.run_cli("alias", "add", "postmaster@localhost", "root@localhost")
        self.run_cli("user", "add", "postmaster@example.org", "--password-stdin", stdin="pw\n")
        status, out, _ = self.run_cli("check-config")
        self.assertEqual(status, 0)
        self.assertNotIn("warning:", out)


class RefusalEscapedTests(AdminTestCase):
    def test_controlCharactersInArgumentShownEscaped(self):
        """A refused argument with a newline and a terminal escape is echoed as one escaped line."""
        status, _, err = self.run_cli("user", "del", "a\n\x1b[2J@localhost")
        self.assertEqual(status, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertNotIn("\x1b", err)
        self.assertIn("\\n\\x1b[2J", err)
