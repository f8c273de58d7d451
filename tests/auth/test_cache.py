"""Tests for mailstack.auth.cache and its use by the checker: hits skip Argon2, changes take effect at once."""

import os

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.auth.cache import LoginCache
from mailstack.auth.cred import UserChecker
from mailstack.auth.userdb import UserDB
from mailstack.interfaces import IUserDB

TTL = 300.0


class CountingUserDB(UserDB):
    """The real user database, counting the Argon2 verifications."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.checks = 0

    def check_password(self, key, password):
        self.checks += 1
        return super().check_password(key, password)


class CheckerCacheTests(SynchronousTestCase):
    def setUp(self):
        d = self.mktemp()
        os.makedirs(d)
        self.users = CountingUserDB(os.path.join(d, "users.json"))
        verifyObject(IUserDB, self.users)
        self.users.add("alice@localhost", "pw")
        self.clock = Clock()
        self.pool_calls = 0

        def run_blocking(f, *a):
            self.pool_calls += 1
            return maybeDeferred(f, *a)

        self.cache = LoginCache(self.clock, TTL)
        self.checker = UserChecker(self.users, run_blocking, cache=self.cache)

    def login(self, password, user=b"alice@localhost"):
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    def assertAccepted(self, password, user=b"alice@localhost"):
        self.assertEqual(self.successResultOf(self.login(password, user)), user.decode().lower())

    def assertRefused(self, password, user=b"alice@localhost"):
        self.failureResultOf(self.login(password, user), UnauthorizedLogin)

    def test_hitSkipsArgon2AndPool(self):
        """A second login with the same password neither verifies with Argon2 nor uses the pool."""
        self.assertAccepted(b"pw")
        self.assertEqual((self.users.checks, self.pool_calls), (1, 1))
        self.assertAccepted(b"pw")
        self.assertAccepted(b"pw", user=b"Alice@LOCALHOST")
        self.assertEqual((self.users.checks, self.pool_calls), (1, 1))

    def test_passwordNotKept(self):
        """The cache holds no copy of the password, only a 32-byte keyed digest."""
        self.users.set_password("alice@localhost", "a-rather-distinctive-password")
        self.assertAccepted(b"a-rather-distinctive-password")
        [(digest, _)] = self.cache._entries.values()
        self.assertEqual(len(digest), 32)
        self.assertNotIn(b"distinctive", digest)

    def test_changedPasswordAtOnce(self):
        """After a password change the old password is refused and the new one accepted, with no wait."""
        self.assertAccepted(b"pw")
        self.users.set_password("alice@localhost", "new")
        self.assertRefused(b"pw")
        self.assertAccepted(b"new")
        self.assertEqual(self.users.checks, 3)

    def test_changedByAnotherProcess(self):
        """A change written by another UserDB (the admin command) is seen through the file."""
        self.assertAccepted(b"pw")
        UserDB(self.users.path).set_password("alice@localhost", "new")
        self.assertRefused(b"pw")
        self.assertAccepted(b"new")

    def test_deletedUserAtOnce(self):
        """A deleted user is refused at once although its login was remembered."""
        self.assertAccepted(b"pw")
        UserDB(self.users.path).delete("alice@localhost")
        self.assertRefused(b"pw")
        self.assertEqual(len(self.cache), 0)

    def test_failuresNeverCached(self):
        """Each wrong password costs a full check and is refused, and does not spoil the right one's entry."""
        self.assertRefused(b"nope")
        self.assertRefused(b"nope")
        self.assertEqual(self.users.checks, 2)
        self.assertEqual(len(self.cache), 0)
        self.assertAccepted(b"pw")
        self.assertRefused(b"nope")
        self.assertEqual(self.users.checks, 4)
        self.assertAccepted(b"pw")
        self.assertEqual(self.users.checks, 4)

    def test_unknownUserNeverCached(self):
        """A login for no user is refused every time after a full (dummy) check."""
        self.assertRefused(b"pw", user=b"bob@localhost")
        self.assertRefused(b"pw", user=b"bob@localhost")
        self.assertEqual((self.users.checks, len(self.cache)), (2, 0))

    def test_expiresAfterTTL(self):
        """An entry serves until the TTL after its verification, not after; then Argon2 runs again."""
        self.assertAccepted(b"pw")
        self.clock.advance(TTL - 1)
        self.assertAccepted(b"pw")
        self.assertEqual(self.users.checks, 1)
        self.clock.advance(1)
        self.assertAccepted(b"pw")
        self.assertEqual(self.users.checks, 2)

    def test_changeDuringCheckNotRemembered(self):
        """If the stored hash changes while Argon2 runs, the result is not remembered."""
        pending = []

        def run_blocking(f, *a):
            pending.append((f, a, Deferred()))
            return pending[-1][2]

        checker = UserChecker(self.users, run_blocking, cache=self.cache)
        d = checker.requestAvatarId(UsernamePassword(b"alice@localhost", b"pw"))
        [(f, a, done)] = pending
        ok = f(*a)
        self.users.set_password("alice@localhost", "new")
        done.callback(ok)
        self.successResultOf(d)
        self.assertEqual(len(self.cache), 0)

    def test_zeroTTLKeepsNothing(self):
        """With a TTL of 0 every login verifies with Argon2."""
        self.checker.cache = LoginCache(self.clock, 0)
        self.assertAccepted(b"pw")
        self.assertAccepted(b"pw")
        self.assertEqual(self.users.checks, 2)


class LRUTests(SynchronousTestCase):
    def test_boundedLeastRecentlyUsedDropped(self):
        """Beyond max_entries the least recently used user is forgotten; a hit counts as a use."""
        clock = Clock()
        cache = LoginCache(clock, TTL, max_entries=2)
        cache.remember("a@x", "ha", b"pa")
        cache.remember("b@x", "hb", b"pb")
        self.assertTrue(cache.hit("a@x", "ha", b"pa"))  # a is now the most recent
        cache.remember("c@x", "hc", b"pc")
        self.assertEqual(len(cache), 2)
        self.assertFalse(cache.hit("b@x", "hb", b"pb"))
        self.assertTrue(cache.hit("a@x", "ha", b"pa"))
        self.assertTrue(cache.hit("c@x", "hc", b"pc"))

    def test_keyedByStoredHash(self):
        """The same password under another stored hash is no hit; a missing hash drops the entry."""
        cache = LoginCache(Clock(), TTL)
        cache.remember("a@x", "h1", b"pw")
        self.assertFalse(cache.hit("a@x", "h2", b"pw"))
        self.assertFalse(cache.hit("a@x", "h1", b"other"))
        self.assertTrue(cache.hit("a@x", "h1", b"pw"))
        self.assertFalse(cache.hit("a@x", None, b"pw"))
        self.assertEqual(len(cache), 0)

    def test_perProcessKey(self):
        """Two caches (two processes) derive different digests for the same login."""
        one, two = LoginCache(Clock(), TTL), LoginCache(Clock(), TTL)
        one.remember("a@x", "h", b"pw")
        two.remember("a@x", "h", b"pw")
        self.assertNotEqual(one._entries["a@x"][0], two._entries["a@x"][0])
