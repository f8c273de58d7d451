"""Tests for mailstack.privileges: start-up files end up owned by twistd's --uid account."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailstack import privileges

UID = GID = 5000  # numeric, no passwd entry needed


class TargetAccountTests(SynchronousTestCase):
    def test_noSwitch(self):
        """No --uid, or uid 0, means no account to act as."""
        self.assertIsNone(privileges.target_account({"uid": None, "gid": None}))
        self.assertIsNone(privileges.target_account({"uid": 0, "gid": 0}))

    def test_explicitGid(self):
        """--uid and --gid are taken as twistd parsed them (when running as root)."""
        if os.geteuid() != 0:
            raise SkipTest("only root switches accounts")
        self.assertEqual(privileges.target_account({"uid": UID, "gid": GID + 1}), (UID, GID + 1))

    def test_noAccountIsNoOp(self):
        """as_account(None) leaves the ids alone."""
        before = (os.geteuid(), os.getegid())
        with privileges.as_account(None):
            self.assertEqual((os.geteuid(), os.getegid()), before)


class AsAccountTests(SynchronousTestCase):
    def test_filesOwnedByAccount(self):
        """Directories and files made inside are the account's; root is back afterwards."""
        if os.geteuid() != 0:
            raise SkipTest("only root switches accounts")
        # Not below pytest's 0700 folder: the account must reach it.
        root = tempfile.mkdtemp(prefix="mailstack-priv-")
        self.addCleanup(shutil.rmtree, root, True)
        os.chmod(root, 0o777)
        # In a child process: effective ids are per process, and the test
        # runner must not change identity under other tests.
        script = textwrap.dedent(f"""\
            import os
            from mailstack import privileges
            from mailstack.storage import fsutil
            with privileges.as_account(({UID}, {GID})):
                fsutil.ensure_dir({root!r} + "/data/tls")
                fsutil.write_atomic({root!r} + "/data/tls/key", b"k")
                try:
                    open("/root/.mailstack-test-forbidden", "w")
                except PermissionError:
                    print("denied")
            print(os.geteuid(), os.getegid())
            """)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        self.assertEqual(out.stdout.split("\n")[:2], ["denied", "0 0"])
        for path in ("data", "data/tls", "data/tls/key"):
            st = os.stat(os.path.join(root, path))
            self.assertEqual((st.st_uid, st.st_gid), (UID, GID), path)
