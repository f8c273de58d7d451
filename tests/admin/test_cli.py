"""Tests for mailstack.admin.cli, run in-process with fake stdio."""

import io
import json
import os
import time
from unittest import mock

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.admin import cli
from mailstack.auth.userdb import UserDB
from mailstack.sendlimits import SendLimits


class CLITests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cfg = os.path.join(self.dir, "m.toml")
        with open(self.cfg, "w") as f:
            f.write('data_dir = "data"\n[domains]\nlocal = ["localhost", "example.org"]\n')

    def run_cli(self, *argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--config", self.cfg, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err, environ={})
        return status, out.getvalue(), err.getvalue()

    def test_dovecotPasswdFileFollowsEveryUserChange(self):
        """With dovecot.passwd_file set, user add, passwd and del each rewrite it
        with the stored Argon2id hashes ({ARGON2ID} lines)."""
        with open(self.cfg, "a") as f:
            f.write('[dovecot]\npasswd_file = "dovecot.passwd"\n')
        path = os.path.join(self.dir, "dovecot.passwd")

        def lines():
            with open(path) as f:
                return f.read().splitlines()

        self.assertEqual(self.run_cli("user", "add", "alice@example.org", "--password-stdin", stdin="pw\n")[0], 0)
        (first,) = lines()
        self.assertTrue(first.startswith("alice@example.org:{ARGON2ID}$argon2id$"), first)
        self.assertEqual(self.run_cli("user", "passwd", "alice@example.org", "--password-stdin", stdin="new\n")[0], 0)
        (second,) = lines()
        self.assertNotEqual(first, second)
        self.assertEqual(self.run_cli("user", "del", "alice@example.org")[0], 0)
        self.assertEqual(lines(), [])

    def test_addAndList(self):
        """user add with --password-stdin, then list --json shows the user."""
        self.assertEqual(self.run_cli("user", "add", "Alice@Example.ORG", "--password-stdin", stdin="pw\n")[0], 0)
        status, out, _ = self.run_cli("user", "list", "--json")
        self.assertEqual(status, 0)
        self.assertEqual([u["address"] for u in json.loads(out)], ["alice@example.org"])
        users = UserDB(os.path.join(self.dir, "data", "users.json"))
        self.assertTrue(users.check_password("alice@example.org", "pw"))

    def test_addTwiceRefused(self):
        """Adding an existing user exits 1 with one line on stderr."""
        self.run_cli("user", "add", "alice@localhost", "--password-stdin", stdin="pw\n")
        status, _, err = self.run_cli("user", "add", "alice@localhost", "--password-stdin", stdin="pw\n")
        self.assertEqual(status, 1)
        self.assertEqual(err, "mailstack: alice@localhost: user exists\n")

    def test_unsafeAndForeignRefused(self):
        """Unsafe, malformed and non-local addresses exit 1 with one clear line."""
        for address in ["../x@localhost", "a/b@localhost", "nodomain", "x@other.example", '"a b"@localhost']:
            status, _, err = self.run_cli("user", "add", address, "--password-stdin", stdin="pw\n")
            self.assertEqual(status, 1, address)
            self.assertEqual(err.count("\n"), 1)
            self.assertTrue(err.startswith(f"mailstack: {address}: "), err)

    def test_emptyPasswordRefused(self):
        """An empty password is refused."""
        self.assertEqual(self.run_cli("user", "add", "a@localhost", "--password-stdin", stdin="\n")[0], 1)

    def test_promptsTwice(self):
        """Without --password-stdin the password is asked twice; a mismatch is refused."""
        with mock.patch("getpass.getpass", side_effect=["one", "two"]):
            status, _, err = self.run_cli("user", "add", "a@localhost")
        self.assertEqual(status, 1)
        self.assertIn("do not match", err)
        with mock.patch("getpass.getpass", side_effect=["one", "one"]) as prompt:
            self.assertEqual(self.run_cli("user", "add", "a@localhost")[0], 0)
        self.assertEqual(prompt.call_count, 2)

    def test_passwdAndDel(self):
        """passwd and del work on users and refuse unknown ones with 1."""
        self.run_cli("user", "add", "a@localhost", "--password-stdin", stdin="one\n")
        self.assertEqual(self.run_cli("user", "passwd", "a@localhost", "--password-stdin", stdin="two\n")[0], 0)
        users = UserDB(os.path.join(self.dir, "data", "users.json"))
        self.assertTrue(users.check_password("a@localhost", "two"))
        self.assertEqual(self.run_cli("user", "del", "a@localhost")[0], 0)
        self.assertEqual(self.run_cli("user", "del", "a@localhost")[0], 1)
        self.assertEqual(self.run_cli("user", "passwd", "a@localhost", "--password-stdin", stdin="x\n")[0], 1)

    def test_aliases(self):
        """alias add (comma-separated targets), list --json and del."""
        status, _, err = self.run_cli("alias", "add", "sales@localhost", "a@localhost,b@remote.example")
        self.assertEqual(status, 0, err)
        status, out, _ = self.run_cli("alias", "list", "--json")
        self.assertEqual(
            json.loads(out), [{"address": "sales@localhost", "targets": ["a@localhost", "b@remote.example"]}]
        )
        self.assertEqual(self.run_cli("alias", "del", "sales@localhost")[0], 0)
        self.assertEqual(self.run_cli("alias", "del", "sales@localhost")[0], 1)
        self.assertEqual(self.run_cli("alias", "add", "x@remote.example", "a@localhost")[0], 1)
        self.assertEqual(self.run_cli("alias", "add", "x@localhost", "not-an-address")[0], 1)

    def test_usageExits2(self):
        """Bad usage exits 2 (argparse)."""
        with self.assertRaises(SystemExit) as e:
            self.run_cli("user", "frobnicate")
        self.assertEqual(e.exception.code, 2)

    def test_checkConfig(self):
        """check-config says ok for a good file and exits 1 with one line for a bad one."""
        self.assertEqual(self.run_cli("check-config")[0], 0)
        with open(self.cfg, "a") as f:
            f.write("[relay]\nmax_queue_lifetime = \"5 parsecs\"\n")
        status, _, err = self.run_cli("check-config")
        self.assertEqual(status, 1)
        self.assertIn("relay.max_queue_lifetime", err)
        self.assertIn(self.cfg, err)

    def test_checkConfigCAFile(self):
        """check-config refuses a relay.tls_ca_file without PEM certificates, in one line."""
        bad = os.path.abspath(self.mktemp())
        with open(bad, "w") as f:
            f.write("not a certificate\n")
        with open(self.cfg, "a") as f:
            f.write(f'[relay]\ntls_ca_file = "{bad}"\n')
        status, _, err = self.run_cli("check-config")
        self.assertEqual(status, 1)
        self.assertIn("relay.tls_ca_file", err)
        self.assertEqual(len(err.strip().splitlines()), 1)

    def test_configFromEnvironment(self):
        """MAILSTACK_CONFIG is used when --config is not given."""
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["check-config"], stdout=out, stderr=err, environ={"MAILSTACK_CONFIG": self.cfg})
        self.assertEqual(status, 0)
        self.assertIn(self.cfg, out.getvalue())


class LimitCommandTests(SynchronousTestCase):
    """``user limit`` and the sending counts in ``user list --json``."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cfg = os.path.join(self.dir, "m.toml")
        with open(self.cfg, "w") as f:
            f.write('data_dir = "data"\n[domains]\nlocal = ["example.org"]\n[limits]\nmessages_per_hour = 20\n')
        self.data = os.path.join(self.dir, "data")
        CLITests.run_cli(self, "user", "add", "alice@example.org", "--password-stdin", stdin="pw\n")

    run_cli = CLITests.run_cli

    def listed(self):
        status, out, _ = self.run_cli("user", "list", "--json")
        self.assertEqual(status, 0)
        (row,) = json.loads(out)
        return row

    def test_listShowsCountsAndLimits(self):
        """list --json has the persisted counts and the effective limits."""
        clock = Clock()
        clock.advance(time.time() - 2 * 3600)
        limits = SendLimits(clock, lambda f, *a, **kw: maybeDeferred(f, *a, **kw), self.data, 20, 0)
        self.successResultOf(limits.reserve("alice@example.org")).commit()
        clock.advance(2 * 3600)
        for _ in range(2):
            self.successResultOf(limits.reserve("alice@example.org")).commit()
        self.successResultOf(limits.flush())
        row = self.listed()
        self.assertEqual(
            {k: row[k] for k in ("sent_last_hour", "sent_today", "limit_per_hour", "limit_per_day")},
            {"sent_last_hour": 2, "sent_today": 3, "limit_per_hour": 20, "limit_per_day": 1000},
        )

    def test_overrideAndReset(self):
        """--per-hour/--per-day set overrides; 'default' resets one of them."""
        status, out, _ = self.run_cli("user", "limit", "Alice@example.org", "--per-hour", "5", "--per-day", "50")
        self.assertEqual(status, 0)
        self.assertEqual(out, "alice@example.org: per hour 5, per day 50\n")
        self.assertEqual((self.listed()["limit_per_hour"], self.listed()["limit_per_day"]), (5, 50))
        status, out, _ = self.run_cli("user", "limit", "alice@example.org", "--per-hour", "default")
        self.assertEqual(out, "alice@example.org: per hour 20 (default), per day 50\n")
        status, out, _ = self.run_cli("user", "limit", "alice@example.org", "--per-day", "0")
        self.assertEqual(out, "alice@example.org: per hour 20 (default), per day no limit\n")
        self.assertEqual(self.listed()["limit_per_day"], 0)

    def test_unknownUserAndBadValue(self):
        """An unknown user exits 1; a value that is neither a count nor 'default' exits 2."""
        status, _, err = self.run_cli("user", "limit", "bob@example.org", "--per-hour", "5")
        self.assertEqual((status, err), (1, "mailstack: bob@example.org: no such user\n"))
        with self.assertRaises(SystemExit) as e:
            self.run_cli("user", "limit", "alice@example.org", "--per-hour", "-3")
        self.assertEqual(e.exception.code, 2)

    def test_deleteDropsOverride(self):
        """Deleting a user drops its override, so a new user of that name has the defaults."""
        self.run_cli("user", "limit", "alice@example.org", "--per-hour", "5")
        self.run_cli("user", "del", "alice@example.org")
        CLITests.run_cli(self, "user", "add", "alice@example.org", "--password-stdin", stdin="pw\n")
        self.assertEqual(self.listed()["limit_per_hour"], 20)
