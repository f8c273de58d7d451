"""Tests for mailstack.auth.userdb and the JSON file machinery under it."""

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.address import AddressError
from mailstack.auth.jsonfile import FileFormatError
from mailstack.auth.userdb import NoSuchUser, UserDB, UserExists
from mailstack.interfaces import IUserDB


class UserDBTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "users.json")
        self.db = UserDB(self.path)

    def test_interface(self):
        """UserDB provides IUserDB."""
        verifyObject(IUserDB, self.db)

    def test_missingFileIsEmpty(self):
        """Without a file there are no users, and nothing is created by reading."""
        self.assertEqual(self.db.keys(), [])
        self.assertFalse(self.db.exists("alice@localhost"))
        self.assertFalse(os.path.exists(self.path))

    def test_hashNotPlaintext(self):
        """The file holds an Argon2id hash, never the password, and is mode 0600."""
        self.db.add("alice@localhost", "s3cret-password")
        with open(self.path, "rb") as f:
            raw = f.read()
        self.assertNotIn(b"s3cret-password", raw)
        doc = json.loads(raw)
        self.assertEqual(doc["version"], 1)
        self.assertTrue(doc["users"]["alice@localhost"]["password"].startswith("$argon2id$"))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_verify(self):
        """check_password accepts the right password (str or bytes) and nothing else."""
        self.db.add("alice@localhost", "right")
        self.assertTrue(self.db.check_password("alice@localhost", b"right"))
        self.assertTrue(self.db.check_password("alice@localhost", "right"))
        self.assertFalse(self.db.check_password("alice@localhost", b"wrong"))
        self.assertFalse(self.db.check_password("bob@localhost", b"right"))
        self.assertFalse(self.db.check_password("bob@localhost", b""))

    def test_storedHashChangesWithEveryPassword(self):
        """stored_hash() is None for no user, stable while the password stays, new
        after set_password (even to the same password), None again after delete."""
        self.assertIsNone(self.db.stored_hash("alice@localhost"))
        self.db.add("alice@localhost", "one")
        first = self.db.stored_hash("alice@localhost")
        self.assertIsInstance(first, str)
        self.assertEqual(self.db.stored_hash("alice@localhost"), first)
        self.assertTrue(first.startswith("$argon2id$"))
        self.db.set_password("alice@localhost", "one")
        self.assertNotEqual(self.db.stored_hash("alice@localhost"), first)
        self.db.delete("alice@localhost")
        self.assertIsNone(self.db.stored_hash("alice@localhost"))

    def test_addTwice(self):
        """Adding an existing user raises UserExists and keeps the old password."""
        self.db.add("alice@localhost", "one")
        self.assertRaises(UserExists, self.db.add, "alice@localhost", "two")
        self.assertTrue(self.db.check_password("alice@localhost", "one"))

    def test_unsafeKeysRefused(self):
        """Keys that could not name a Maildir safely never get into the file."""
        for key in ["../x@localhost", "a/b@localhost", '"a b"@localhost', "x@[127.0.0.1]", "Alice@localhost"]:
            self.assertRaises((AddressError, ValueError), self.db.add, key, "pw")
        self.assertEqual(self.db.keys(), [])

    def test_passwdAndDelete(self):
        """set_password replaces the hash; delete removes; both refuse unknown users."""
        self.db.add("alice@localhost", "one")
        self.db.set_password("alice@localhost", "two")
        self.assertFalse(self.db.check_password("alice@localhost", "one"))
        self.assertTrue(self.db.check_password("alice@localhost", "two"))
        self.assertRaises(NoSuchUser, self.db.set_password, "bob@localhost", "x")
        self.db.delete("alice@localhost")
        self.assertEqual(self.db.keys(), [])
        self.assertRaises(NoSuchUser, self.db.delete, "alice@localhost")

    def test_reloadOnChange(self):
        """A second instance (the running server) sees another's writes without restart."""
        server = UserDB(self.path)
        self.assertFalse(server.exists("alice@localhost"))
        self.db.add("alice@localhost", "pw")
        self.assertTrue(server.exists("alice@localhost"))
        self.db.delete("alice@localhost")
        self.assertFalse(server.exists("alice@localhost"))

    def test_noReparseWithoutChange(self):
        """An unchanged file is not parsed again (the check is a stat)."""
        self.db.add("alice@localhost", "pw")
        server = UserDB(self.path)
        reads = []
        original = server._file._read
        server._file._read = lambda: reads.append(1) or original()
        for _ in range(5):
            server.exists("alice@localhost")
        self.assertEqual(reads, [])

    def test_noLeftoverTempFiles(self):
        """Atomic rewrites leave only the file and its lock in the folder."""
        self.db.add("alice@localhost", "pw")
        self.db.add("bob@localhost", "pw")
        self.assertEqual(sorted(os.listdir(self.dir)), ["users.json", "users.lock"])

    def test_brokenFileAtStart(self):
        """A corrupt file is refused at start with a one-line FileFormatError."""
        with open(self.path, "w") as f:
            f.write("{not json")
        e = self.assertRaises(FileFormatError, UserDB, self.path)
        self.assertIn(self.path, str(e))
        self.assertNotIn("\n", str(e))

    def test_brokenFileWhileRunningKeepsUsers(self):
        """If the file turns bad under a running server, the last good users stay."""
        self.db.add("alice@localhost", "pw")
        server = UserDB(self.path)
        with open(self.path, "w") as f:
            f.write('{"version": 99, "users": {}}')
        self.assertTrue(server.exists("alice@localhost"))

    def test_info(self):
        """info() gives the creation time but never the hash."""
        self.db.add("alice@localhost", "pw")
        self.assertEqual(set(self.db.info("alice@localhost")), {"created"})
        self.assertRaises(NoSuchUser, self.db.info, "bob@localhost")
