"""Tests for mailstack.auth.cred: the checker, the realm and the portal login."""

import os
import threading

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.auth.cred import IMailUser, MailRealm, UserChecker, login, login_portal
from mailstack.auth.userdb import UserDB
from mailstack.threadpool import ThreadPool
from tests.test_threadpool import RecordingReactor


def sync(f, *a, **kw):
    return maybeDeferred(f, *a, **kw)


class CheckerTests(SynchronousTestCase):
    def setUp(self):
        d = self.mktemp()
        os.makedirs(d)
        self.users = UserDB(os.path.join(d, "users.json"))
        self.users.add("alice@localhost", "pw")
        self.checker = UserChecker(self.users, sync)

    def test_interface(self):
        """UserChecker is an ICredentialsChecker for IUsernamePassword."""
        verifyObject(ICredentialsChecker, self.checker)

    def test_portalLogin(self):
        """Logging in through the portal gives the user key of an IMailUser avatar."""
        portal = login_portal(self.checker)
        self.assertEqual(self.successResultOf(login(portal, b"Alice@localhost", b"pw")), "alice@localhost")
        self.failureResultOf(login(portal, b"alice@localhost", b"nope"), UnauthorizedLogin)

    def test_realmOnlyMailUsers(self):
        """The realm hands out IMailUser avatars and nothing else."""
        iface, avatar, logout = MailRealm().requestAvatar("bob@localhost", None, IMailUser)
        self.assertEqual((iface, avatar.key), (IMailUser, "bob@localhost"))
        self.assertRaises(NotImplementedError, MailRealm().requestAvatar, "bob@localhost", None, ICredentialsChecker)

    def test_success(self):
        """Right password: the avatar id is the normalised user key (str)."""
        d = self.checker.requestAvatarId(UsernamePassword(b"Alice@LOCALHOST", b"pw"))
        self.assertEqual(self.successResultOf(d), "alice@localhost")

    def test_wrongPassword(self):
        """Wrong password or unknown user fail with UnauthorizedLogin."""
        for user, pw in [(b"alice@localhost", b"nope"), (b"bob@localhost", b"pw")]:
            d = self.checker.requestAvatarId(UsernamePassword(user, pw))
            self.failureResultOf(d, UnauthorizedLogin)

    def test_badUsername(self):
        """A username that is no address (or no UTF-8) fails without hashing."""
        calls = []
        checker = UserChecker(self.users, lambda f, *a: calls.append(f))
        for user in [b"alice", b"\xff@localhost", b"a b@localhost"]:
            self.failureResultOf(checker.requestAvatarId(UsernamePassword(user, b"pw")), UnauthorizedLogin)
        self.assertEqual(calls, [])

    def test_usesRunBlocking(self):
        """The password check goes through run_blocking, not a direct call."""
        calls = []

        def record(f, *a, **kw):
            calls.append(f)
            return maybeDeferred(f, *a, **kw)

        checker = UserChecker(self.users, record)
        self.successResultOf(checker.requestAvatarId(UsernamePassword(b"alice@localhost", b"pw")))
        self.assertEqual(calls, [self.users.check_password])


class ThreadTests(SynchronousTestCase):
    """With the production run_blocking (``mailstack.threadpool.ThreadPool.run``), hashing happens off
    the reactor thread."""

    def test_hashingOffReactorThread(self):
        """check_password runs in a pool thread, not the calling (reactor) thread."""
        d = self.mktemp()
        os.makedirs(d)
        users = UserDB(os.path.join(d, "users.json"))
        users.add("alice@localhost", "pw")
        threads = []
        original = users.check_password

        def spy(key, password):
            threads.append(threading.current_thread())
            return original(key, password)

        users.check_password = spy
        reactor = RecordingReactor()
        pool = ThreadPool(reactor, 2, "test")
        self.addCleanup(pool.stop)
        checker = UserChecker(users, pool.run)
        result = checker.requestAvatarId(UsernamePassword(b"alice@localhost", b"pw"))
        pool.start()
        pool.stop()  # joins: the queued check has run
        self.assertNoResult(result)  # results come back only through callFromThread
        reactor.run_calls()
        self.assertEqual(self.successResultOf(result), "alice@localhost")
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.current_thread())


class ParallelLimitTests(SynchronousTestCase):
    def test_atMostParallelChecks(self):
        """No more than ``parallel`` password checks are handed to the pool at once;
        the others wait their turn and still complete."""
        pending = []

        def run_blocking(f, *a):
            d = Deferred()
            pending.append((d, f, a))
            return d

        users = type("Users", (), {"check_password": lambda self, key, pw: True})()
        checker = UserChecker(users, run_blocking, parallel=2)
        results = [checker.requestAvatarId(UsernamePassword(b"u%d@localhost" % i, b"pw")) for i in range(5)]
        self.assertEqual(len(pending), 2)
        while pending:
            d, f, a = pending.pop(0)
            d.callback(f(*a))
        self.assertEqual([self.successResultOf(r) for r in results], [f"u{i}@localhost" for i in range(5)])
