"""Tests for mailstack.auth.aliases."""

import json
import os

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.auth.aliases import AliasDB, NoSuchAlias
from mailstack.interfaces import IAliasDB


class AliasDBTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "aliases.json")
        self.db = AliasDB(self.path)

    def test_interface(self):
        """AliasDB provides IAliasDB."""
        verifyObject(IAliasDB, self.db)

    def test_addExtendsAndDedups(self):
        """add creates an alias, a second add extends it without duplicates."""
        self.db.add("sales@localhost", ["alice@localhost", "bob@example.org"])
        self.db.add("sales@localhost", ["bob@example.org", "carol@localhost"])
        self.assertEqual(
            self.db.targets("sales@localhost"), ["alice@localhost", "bob@example.org", "carol@localhost"]
        )
        self.assertIsNone(self.db.targets("alice@localhost"))

    def test_fileFormat(self):
        """The file is versioned JSON with an "aliases" table."""
        self.db.add("sales@localhost", ["alice@localhost"])
        with open(self.path) as f:
            self.assertEqual(json.load(f), {"version": 1, "aliases": {"sales@localhost": ["alice@localhost"]}})

    def test_delete(self):
        """delete removes an alias and refuses an unknown one."""
        self.db.add("sales@localhost", ["alice@localhost"])
        self.db.delete("sales@localhost")
        self.assertEqual(self.db.items(), [])
        self.assertRaises(NoSuchAlias, self.db.delete, "sales@localhost")

    def test_refusesUnnormalised(self):
        """Keys and targets must be normalised address keys; empty targets refused."""
        self.assertRaises(ValueError, self.db.add, "Sales@localhost", ["a@localhost"])
        self.assertRaises(ValueError, self.db.add, "sales@localhost", ["not an address"])
        self.assertRaises(ValueError, self.db.add, "sales@localhost", [])

    def test_reload(self):
        """A running server's AliasDB sees changes made by another instance."""
        server = AliasDB(self.path)
        self.db.add("sales@localhost", ["alice@localhost"])
        self.assertEqual(server.targets("sales@localhost"), ["alice@localhost"])
