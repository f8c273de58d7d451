"""Tests for mailstack.dovecotpw: the passwd-file Dovecot reads, kept in step with the users."""

import os
import shutil
import stat
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailstack import dovecotpw
from mailstack.auth.userdb import UserDB

PHC = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"


class RenderTests(SynchronousTestCase):
    def test_line(self):
        """user:{ARGON2ID}<PHC string>::::: with the hash unchanged."""
        self.assertEqual(dovecotpw.passwd_line("a@example.org", PHC), f"a@example.org:{{ARGON2ID}}{PHC}:::::")

    def test_unusableSkipped(self):
        """Keys with ':' or control characters, and unknown schemes, are left out."""
        self.assertIsNone(dovecotpw.passwd_line("a:b@example.org", PHC))
        self.assertIsNone(dovecotpw.passwd_line("a\n@example.org", PHC))
        self.assertIsNone(dovecotpw.passwd_line("a@example.org", "$2b$12$bcrypt"))
        self.assertIsNone(dovecotpw.passwd_line("a@example.org", "plain"))
        body = dovecotpw.render({"b@x": PHC, "a:b@x": PHC, "a@x": PHC})
        self.assertEqual(body.decode().splitlines(), [f"a@x:{{ARGON2ID}}{PHC}:::::", f"b@x:{{ARGON2ID}}{PHC}:::::"])


class SyncTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.users = UserDB(os.path.join(self.dir, "users.json"))
        self.path = os.path.join(self.dir, "passwd")

    def lines(self):
        with open(self.path) as f:
            return f.read().splitlines()

    def test_inStepWithChanges(self):
        """add, passwd and del are reflected by the next sync."""
        self.users.add("a@example.org", "pw1")
        self.users.add("b@example.org", "pw2")
        self.assertEqual(dovecotpw.sync(self.users, self.path), 2)
        first = self.lines()
        self.assertEqual([line.split(":")[0] for line in first], ["a@example.org", "b@example.org"])
        self.users.set_password("a@example.org", "pw3")
        self.users.delete("b@example.org")
        dovecotpw.sync(self.users, self.path)
        (line,) = self.lines()
        self.assertNotEqual(line, first[0])
        with self.users.hashes_locked() as hashes:
            self.assertEqual(line, dovecotpw.passwd_line("a@example.org", hashes["a@example.org"]))

    def test_modeDespiteUmask(self):
        """The file is 0640 (readable by Dovecot's group) whatever the umask."""
        self.users.add("a@example.org", "pw")
        old = os.umask(0o077)
        try:
            dovecotpw.sync(self.users, self.path)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith(".tmp")], [])

    def test_everyRewriteNewerBySeconds(self):
        """Each rewrite has an mtime in a later whole second, so Dovecot re-reads it
        even when the size stays the same (a password change)."""
        self.users.add("a@example.org", "pw")
        stamps = []
        for password in ("pw1", "pw2", "pw3"):
            self.users.set_password("a@example.org", password)
            dovecotpw.sync(self.users, self.path)
            stamps.append((int(os.stat(self.path).st_mtime), os.stat(self.path).st_size))
        self.assertEqual(len({size for _, size in stamps}), 1)
        self.assertTrue(stamps[0][0] < stamps[1][0] < stamps[2][0], stamps)

    def test_failedWriteKeepsOldFile(self):
        """A write that fails leaves the previous file whole and no temporary file."""
        self.users.add("a@example.org", "pw")
        dovecotpw.sync(self.users, self.path)
        before = self.lines()

        def broken(*a):
            raise OSError(28, "No space left on device")

        self.patch(dovecotpw.os, "rename", broken)
        self.users.add("b@example.org", "pw")
        self.assertRaises(OSError, dovecotpw.sync, self.users, self.path)
        self.assertEqual(self.lines(), before)
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith(".tmp")], [])

    def test_doveadmVerifies(self):
        """Dovecot itself accepts the line's hash for the right password only."""
        doveadm = shutil.which("doveadm")
        if doveadm is None:
            raise SkipTest("doveadm is not installed")
        self.users.add("a@example.org", "correct horse")
        dovecotpw.sync(self.users, self.path)
        (line,) = self.lines()
        hashed = line.split(":")[1]
        ok = subprocess.run(
            [doveadm, "pw", "-t", hashed, "-p", "correct horse"], check=False, capture_output=True, timeout=60
        )
        self.assertEqual(ok.returncode, 0, ok.stderr)
        bad = subprocess.run([doveadm, "pw", "-t", hashed, "-p", "wrong"], check=False, capture_output=True, timeout=60)
        self.assertNotEqual(bad.returncode, 0)
