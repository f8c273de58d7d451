"""Tests for mailstack.auth.login: lockout, portal login and the throttle's bookkeeping."""

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.auth.login import Authenticator, LoginResult, account_key
from tests.support.fakes import FakeChecker, FakeThrottle


class AccountKeyTests(SynchronousTestCase):
    def test_accountKey(self) -> None:
        """An address becomes its key (``Address.key``); anything else its lowered text."""
        self.assertEqual(account_key(b"Alice@Example.ORG"), "alice@example.org")
        self.assertEqual(account_key(b"NoDomain"), "nodomain")
        self.assertEqual(account_key(b"\xff@x"), "\ufffd@x")


class AuthenticatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.checker = FakeChecker()
        self.throttle = FakeThrottle(delay=3.0)
        self.clock = Clock()
        self.auth = Authenticator(self.checker, self.throttle, self.clock)

    def test_success(self) -> None:
        """Right credentials: the user key; the throttle forgets the peer."""
        result = self.successResultOf(self.auth.login("192.0.2.1", b"alice@example.org", b"secret"))
        self.assertEqual(result, LoginResult("alice@example.org", key="alice@example.org"))
        self.assertEqual(self.throttle.successes, [("192.0.2.1", "alice@example.org")])

    def test_failureCountedWithDelay(self) -> None:
        """Wrong credentials: no key, the throttle's delay, and the failure recorded."""
        result = self.successResultOf(self.auth.login("192.0.2.1", b"alice@example.org", b"wrong"))
        self.assertEqual(result, LoginResult("alice@example.org", delay=3.0))
        self.assertEqual(self.throttle.failures, [("192.0.2.1", "alice@example.org")])

    def test_foreignAuthzidCounted(self) -> None:
        """password None (PLAIN with another authorization identity) is refused without a check, and counted."""
        result = self.successResultOf(self.auth.login("192.0.2.1", b"alice@example.org", None))
        self.assertIsNone(result.key)
        self.assertEqual(self.checker.calls, [])
        self.assertEqual(len(self.throttle.failures), 1)

    def test_lockedNotChecked(self) -> None:
        """A locked-out account is refused before the password is checked, and nothing is recorded."""
        self.throttle.locked_out.add("alice@example.org")
        result = self.successResultOf(self.auth.login("192.0.2.1", b"Alice@example.org", b"secret"))
        self.assertTrue(result.locked)
        self.assertEqual((self.checker.calls, self.throttle.failures), ([], []))

    def test_failureCountedAfterClientLeft(self) -> None:
        """The failure is recorded when the check ends, whoever still waits for it."""
        self.checker.manual = True
        d = self.auth.login("192.0.2.1", b"alice@example.org", b"wrong")
        self.assertEqual(self.throttle.failures, [])
        self.checker.pending[0].errback(UnauthorizedLogin())
        self.assertEqual(len(self.throttle.failures), 1)
        self.successResultOf(d)

    def test_checkerErrorPropagates(self) -> None:
        """A checker that breaks (not a refusal) errbacks: the protocol answers with a temporary failure."""
        self.checker.error = RuntimeError("database gone")
        self.failureResultOf(self.auth.login("192.0.2.1", b"alice@example.org", b"secret"), RuntimeError)
        self.assertEqual(self.throttle.failures, [])
        self.assertEqual(self.throttle.abandoned, [("192.0.2.1", "alice@example.org")])
        self.assertEqual(self.throttle.in_flight, [])

    def test_attemptReservedBeforeCheck(self) -> None:
        """The attempt is reserved with the throttle while its password is being checked."""
        self.checker.manual = True
        d = self.auth.login("192.0.2.1", b"alice@example.org", b"secret")
        self.assertEqual(self.throttle.in_flight, [("192.0.2.1", "alice@example.org")])
        self.checker.pending[0].callback("alice@example.org")
        self.successResultOf(d)
        self.assertEqual(self.throttle.in_flight, [])

    def test_slowedAccountWaitsBeforeCheck(self) -> None:
        """A ticket with a delay holds the password check back by that many seconds."""
        self.throttle.pre_delay = 4.0
        d = self.auth.login("192.0.2.1", b"alice@example.org", b"secret")
        self.assertEqual(self.checker.calls, [])
        self.clock.advance(3.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d).key, "alice@example.org")


class AuthFailureMetricTests(SynchronousTestCase):
    def test_failuresCountedByProtocol(self) -> None:
        """Wrong credentials and locked-out attempts count in auth_failures_total under
        the listener's protocol; a success does not."""
        from mailstack.metrics import Metrics

        metrics = Metrics()
        throttle = FakeThrottle()
        auth = Authenticator(FakeChecker(), throttle, Clock(), metrics, "pop3")
        self.successResultOf(auth.login("192.0.2.1", b"alice@example.org", b"secret"))
        self.successResultOf(auth.login("192.0.2.1", b"alice@example.org", b"wrong"))
        throttle.locked_out.add("alice@example.org")
        self.successResultOf(auth.login("192.0.2.1", b"alice@example.org", b"secret"))
        text = metrics.exposition().decode()
        self.assertIn('mailstack_auth_failures_total{protocol="pop3"} 2.0', text)
        self.assertIn('mailstack_auth_failures_total{protocol="smtp"} 0.0', text)
