"""The MAIL reservation against the sending limits when the limits answer late,
fail, or the client leaves at any point of the transaction (no hold leaks)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack.errors import Reply
from mailstack.interfaces import IReservation, ISendLimits
from mailstack.pipeline import Check, Pipeline
from tests.smtp.support import Session, make_runtime

SEND = b"MAIL FROM:<alice@example.org>"


@implementer(IReservation)
class Hold:
    """A reservation that records its end."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.ended: list[str] = []

    def commit(self) -> None:
        self.ended.append("commit")

    def release(self) -> None:
        self.ended.append("release")


@implementer(ISendLimits)
class LateLimits:
    """Sending limits in another process: every ``reserve`` waits for the test to answer."""

    def __init__(self) -> None:
        self.asked: list[Deferred] = []

    def reserve(self, user: str) -> Deferred:
        d: Deferred = Deferred()
        self.asked.append(d)
        return d


class SlowMailCheck(Check):
    """A MAIL check that answers when the test fires ``pending``."""

    name = "slow"

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def mail(self, conn, txn):
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


def held(session: Session) -> int:
    """Messages of alice held against the real limits of the session's runtime."""
    return session.runtime.send_limits.held.get("alice@example.org", 0)


class LateAnswerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.limits = LateLimits()
        verifyObject(ISendLimits, self.limits)
        verifyObject(IReservation, Hold("alice@example.org"))
        rt = make_runtime()
        rt.send_limits = self.limits
        self.s = Session("submissions", rt)
        self.s.login()

    def test_mailWaitsForTheLimits(self) -> None:
        """MAIL is answered only when the limits answer; pipelined commands wait behind it."""
        self.assertEqual(self.s.codes(SEND, b"NOOP"), [])
        self.limits.asked[0].callback(Hold("alice@example.org"))
        self.assertEqual(self.s.take().split(b"\r\n")[:-1], [b"250 2.1.0 Sender ok", b"250 2.0.0 Ok"])

    def test_refusalAnswered(self) -> None:
        """The limits' late 451 4.7.1 is the MAIL reply."""
        self.s.talk(SEND)
        self.limits.asked[0].callback(Reply(451, "4.7.1", "Hourly sending limit of 1 messages reached"))
        self.assertTrue(self.s.take().startswith(b"451 4.7.1 Hourly"))

    def test_limitsUnavailable(self) -> None:
        """Limits that cannot answer (the master is gone) give 451 4.3.0, logged, the session goes on."""
        self.s.talk(SEND)
        self.limits.asked[0].errback(ConnectionError("master gone"))
        self.assertTrue(self.s.take().startswith(b"451 4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertEqual(self.s.codes(b"NOOP"), [b"250 2.0.0"])

    def test_clientLeftBeforeTheAnswer(self) -> None:
        """A hold granted after the client left is released at once."""
        self.s.talk(SEND)
        self.s.proto.connectionLost(None)
        hold = Hold("alice@example.org")
        self.limits.asked[0].callback(hold)
        self.assertEqual(hold.ended, ["release"])

    def test_rsetReleases(self) -> None:
        """RSET after an accepted MAIL releases the hold once."""
        self.s.talk(SEND)
        hold = Hold("alice@example.org")
        self.limits.asked[0].callback(hold)
        self.s.talk(b"RSET")
        self.s.proto.connectionLost(None)
        self.assertEqual(hold.ended, ["release"])


class ClientLeavesTests(SynchronousTestCase):
    def mail_waiting_on_checks(self) -> tuple[Session, SlowMailCheck]:
        """A logged-in session whose MAIL holds a reservation while a slow MAIL check runs."""
        rt = make_runtime(limits={"messages_per_hour": 5})
        check = SlowMailCheck()
        rt.pipeline = Pipeline([check], rt.reactor)
        s = Session("submissions", rt)
        s.login()
        s.talk(SEND)
        return s, check

    def test_leftDuringMailChecks(self) -> None:
        """A client that leaves while the MAIL checks run frees its hold."""
        s, check = self.mail_waiting_on_checks()
        self.assertEqual(held(s), 1)
        s.proto.connectionLost(None)
        self.assertEqual(held(s), 0)
        check.pending[0].callback(None)
        self.assertEqual(held(s), 0)

    def test_refusedByMailChecks(self) -> None:
        """A MAIL the checks refuse frees its hold."""
        s, check = self.mail_waiting_on_checks()
        check.pending[0].callback(Reply(550, "5.7.1", "no"))
        self.assertEqual((s.take()[:9], held(s)), (b"550 5.7.1", 0))

    def test_leftDuringCommit(self) -> None:
        """A client that leaves while its message is being committed still has it counted."""
        rt = make_runtime(limits={"messages_per_hour": 5})
        rt.intake.manual = True
        s = Session("submissions", rt)
        s.login()
        s.talk(SEND, b"RCPT TO:<bob@example.org>", b"DATA", b"Subject: t\r\n\r\nhi\r\n.")
        s.proto.connectionLost(None)
        self.assertEqual(held(s), 1)
        rt.intake.begun[0].commit()
        self.assertEqual(held(s), 0)
        self.assertEqual(s.runtime.send_limits.usage("alice@example.org").sent_last_hour, 1)

    def test_failedCommitReleases(self) -> None:
        """A message the intake fails to commit is not counted; its hold is freed."""
        rt = make_runtime(limits={"messages_per_hour": 5})
        rt.intake.fail_with = OSError("disk full")
        s = Session("submissions", rt)
        s.login()
        s.talk(SEND, b"RCPT TO:<bob@example.org>", b"DATA", b"Subject: t\r\n\r\nhi\r\n.")
        self.flushLoggedErrors(OSError)
        self.assertEqual((held(s), s.runtime.send_limits.usage("alice@example.org").sent_last_hour), (0, 0))

