"""Where the SMTP session calls the message pipeline, and how it answers what the checks say."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack.address import Address
from mailstack.envelope import HeaderChanges
from mailstack.errors import Reply
from mailstack.interfaces import (
    IIncoming,
    IMessage,
    IMessageCheck,
    IMessageObserver,
    IPipeline,
)
from mailstack.pipeline import Check, Pipeline, Verdict
from tests.support.fakes import FakeMessage

from .support import Session, make_runtime

REFUSE = Reply(550, "5.7.1", "Not from you")
LATER = Reply(451, "4.7.1", "Greylisted, try again later")
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


@implementer(IMessageObserver)
class Scripted(Check):
    """Answers each stage from ``answers`` and records what it was shown."""

    name = "scripted"

    def __init__(self, mx: bool = True, submission: bool = True, **answers: Any) -> None:
        self.mx = mx
        self.submission = submission
        self.answers = answers
        self.seen: list[tuple] = []
        self.observed: list[bytes] = []

    def _answer(self, stage: str, *args: Any) -> Any:
        self.seen.append((stage,) + args)
        answer = self.answers.get(stage)
        return answer() if callable(answer) else answer

    def connect(self, conn):
        return self._answer("connect", conn.peer, conn.listener)

    def mail(self, conn, txn):
        return self._answer("mail", txn.sender, dict(txn.params), conn.helo)

    def rcpt(self, conn, txn, recipient):
        return self._answer("rcpt", recipient, len(txn.recipients))

    def data_begin(self, conn, txn):
        self.seen.append(("data_begin",))
        return self

    def write(self, data: bytes) -> None:
        self.observed.append(data)

    def data(self, conn, txn, message):
        self.message = message
        return self._answer("data", tuple(str(d.address) for d in txn.recipients), conn.user)


def session(check: Check, kind: str = "smtp", **sections: Any) -> Session:
    rt = make_runtime(**sections)
    rt.pipeline = Pipeline([check], rt.reactor, timeout=30)
    return Session(kind, rt)


def transaction(s: Session, message: bytes = MESSAGE) -> list[bytes]:
    return s.codes(
        b"EHLO client.test",
        b"MAIL FROM:<carol@remote.test> BODY=8BITMIME SIZE=100",
        b"RCPT TO:<alice@example.org>",
        b"DATA",
        message + b".",
    )


class ConnectTests(SynchronousTestCase):
    def test_fakesProvideTheirInterfaces(self):
        """The scripted check, the fake runtime's pipeline, incoming and message views verify."""
        check = Scripted()
        verifyObject(IMessageCheck, check)
        verifyObject(IMessageObserver, check)
        s = session(check)
        verifyObject(IPipeline, s.runtime.pipeline)
        verifyObject(IMessage, FakeMessage(MESSAGE))
        s.codes(b"EHLO client.test", b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@example.org>", b"DATA")
        verifyObject(IIncoming, s.intake.begun[0])

    def test_connectChecksSeeThePeer(self):
        """The connect stage runs before the banner, with the peer and listener kind."""
        check = Scripted()
        s = session(check)
        self.assertTrue(s.banner.startswith(b"220 mx.example.org"))
        self.assertEqual(check.seen, [("connect", "192.0.2.7", "smtp")])

    def test_permanentRefusalWaitsForQuit(self):
        """A 5xx at connect replaces the banner with 554; every command but QUIT gets 503 (RFC 5321 3.1)."""
        s = session(Scripted(connect=REFUSE))
        self.assertEqual(s.banner, b"554 5.7.1 Not from you\r\n")
        self.assertEqual(s.codes(b"EHLO client.test", b"MAIL FROM:<a@b.test>"), [b"503 5.5.1", b"503 5.5.1"])
        self.assertFalse(s.closed)
        self.assertEqual(s.codes(b"QUIT"), [b"221 2.0.0"])
        self.assertTrue(s.closed)

    def test_temporaryRefusalIs421(self):
        """A 4xx at connect is sent as 421 and the connection closed."""
        s = session(Scripted(connect=LATER))
        self.assertEqual(s.banner, b"421 4.7.1 Greylisted, try again later\r\n")
        self.assertTrue(s.closed)

    def test_asynchronousConnectHoldsTheBannerAndInput(self):
        """While a connect check waits, no banner goes out and early input waits (and is then answered)."""
        pending: Deferred = Deferred()
        s = session(Scripted(connect=lambda: pending))
        self.assertEqual(s.banner, b"")
        self.assertEqual(s.send(b"EHLO early.test\r\n"), b"")
        pending.callback(None)
        out = s.take()
        self.assertTrue(out.startswith(b"220 mx.example.org"))
        self.assertIn(b"250-mx.example.org Hello early.test", out)


class MailRcptTests(SynchronousTestCase):
    def test_mailSeesSenderParametersAndHelo(self):
        """The mail stage gets the sender, the MAIL parameters and the HELO name."""
        check = Scripted()
        s = session(check)
        self.assertEqual(transaction(s)[-1], b"250 2.0.0")
        self.assertEqual(
            check.seen[1], ("mail", Address("carol", "remote.test"), {"BODY": "8BITMIME", "SIZE": "100"}, "client.test")
        )

    def test_mailRefused(self):
        """A Reply from the mail stage refuses MAIL; no transaction is open afterwards."""
        s = session(Scripted(mail=REFUSE))
        self.assertEqual(s.codes(b"EHLO client.test")[-1][:3], b"250")
        self.assertEqual(s.codes(b"MAIL FROM:<carol@remote.test>"), [b"550 5.7.1"])
        self.assertEqual(s.codes(b"RCPT TO:<alice@example.org>"), [b"503 5.5.1"])

    def test_rcptRunsAfterRouting(self):
        """The rcpt stage sees routed recipients only; its Reply refuses that RCPT, the others go on."""
        answers = iter([None, LATER])
        check = Scripted(rcpt=lambda: next(answers))
        s = session(check)
        codes = s.codes(
            b"EHLO client.test",
            b"MAIL FROM:<carol@remote.test>",
            b"RCPT TO:<nobody@example.org>",
            b"RCPT TO:<alice@example.org>",
            b"RCPT TO:<bob@example.org>",
            b"DATA",
            MESSAGE + b".",
        )
        self.assertEqual(codes[2:], [b"550 5.1.1", b"250 2.1.5", b"451 4.7.1", b"354 End d", b"250 2.0.0"])
        rcpts = [entry for entry in check.seen if entry[0] == "rcpt"]
        self.assertEqual(
            rcpts, [("rcpt", Address("alice", "example.org"), 0), ("rcpt", Address("bob", "example.org"), 1)]
        )
        self.assertEqual([str(d.address) for d in s.intake.committed[0].envelope.recipients], ["alice@example.org"])

    def test_asynchronousRcpt(self):
        """A pending rcpt check holds the reply and the commands pipelined behind it, in order."""
        pending: Deferred = Deferred()
        s = session(Scripted(rcpt=lambda: pending))
        s.codes(b"EHLO client.test", b"MAIL FROM:<carol@remote.test>")
        self.assertEqual(s.send(b"RCPT TO:<alice@example.org>\r\nNOOP\r\n"), b"")
        pending.callback(None)
        self.assertEqual(s.take(), b"250 2.1.5 Recipient ok\r\n250 2.0.0 Ok\r\n")


class DataTests(SynchronousTestCase):
    def test_dataRefusedAbortsTheMessage(self):
        """A Verdict with a Reply refuses the message and the intake discards it."""
        s = session(Scripted(data=Verdict(reply=REFUSE)))
        self.assertEqual(transaction(s)[-1], b"550 5.7.1")
        self.assertTrue(s.intake.begun[0].aborted)
        self.assertEqual(s.intake.committed, [])

    def test_changesReachTheIntake(self):
        """The accumulated header changes are handed to finish()."""
        s = session(Scripted(data=Verdict(prepend=(b"X-Checked: yes\r\n",))))
        self.assertEqual(transaction(s)[-1], b"250 2.0.0")
        self.assertEqual(s.intake.committed[0].changes, HeaderChanges((b"X-Checked: yes\r\n",)))

    def test_checksSeeTheMessage(self):
        """The observer gets the bytes as they arrive; data() gets the header fields and the recipients."""
        check = Scripted()
        s = session(check)
        transaction(s)
        self.assertEqual(b"".join(check.observed), MESSAGE)
        self.assertEqual([n for n, _ in check.message.header], ["Subject"])
        self.assertEqual(check.seen[-1], ("data", ("alice@example.org",), ""))

    def test_connectionLostDuringChecksDiscards(self):
        """If the client leaves while the end-of-data checks run, the message is discarded."""
        pending: Deferred = Deferred()
        s = session(Scripted(data=lambda: pending))
        transaction(s)
        s.proto.connectionLost(None)
        self.assertTrue(s.intake.begun[0].aborted)
        pending.callback(None)
        self.assertEqual(s.intake.committed, [])

    def test_failingCheckIs451(self):
        """A check that raises at end of data: 451 4.3.0, the message discarded, the session goes on."""

        def boom() -> None:
            raise RuntimeError("no detail for the client")

        s = session(Scripted(data=boom))
        self.assertEqual(transaction(s)[-1], b"451 4.3.0")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(s.intake.begun[0].aborted)
        self.assertEqual(s.codes(b"NOOP"), [b"250 2.0.0"])


class SubmissionTests(SynchronousTestCase):
    def test_authSwitchesToTheSubmissionChecks(self):
        """On the MX listener an MX-only check runs until AUTH, not after."""
        check = Scripted(submission=False)
        s = session(check, auth={"plaintext_on_loopback": False})
        s.codes(b"EHLO client.test", b"MAIL FROM:<carol@remote.test>", b"RSET")
        self.assertEqual([e[0] for e in check.seen], ["connect", "mail"])
        s.login()
        s.codes(b"MAIL FROM:<alice@example.org>")
        self.assertEqual([e[0] for e in check.seen], ["connect", "mail"])

    def test_submissionListenerRunsSubmissionChecks(self):
        """A submission-only check runs on the submission listener, with the user known."""
        check = Scripted(mx=False)
        s = session(check, "submissions")
        s.login()
        transaction_codes = s.codes(
            b"MAIL FROM:<alice@example.org>", b"RCPT TO:<carol@remote.test>", b"DATA", MESSAGE + b"."
        )
        self.assertEqual(transaction_codes[-1], b"250 2.0.0")
        self.assertEqual(check.seen[-1], ("data", ("carol@remote.test",), "alice@example.org"))


@implementer(IPipeline)
class BrokenPipeline:
    """A pipeline with a bug: every stage but connect raises."""

    def connect(self, conn):
        return None

    def mail(self, conn, txn):
        raise RuntimeError("pipeline bug")

    def rcpt(self, conn, txn, recipient):
        raise RuntimeError("pipeline bug")

    def data_begin(self, conn, txn):
        raise RuntimeError("pipeline bug")

    def data(self, conn, txn, message):
        raise RuntimeError("pipeline bug")


class BrokenPipelineTests(SynchronousTestCase):
    def test_pipelineBugIs451(self):
        """Should the pipeline itself raise, MAIL gets 451 4.3.0 and the error is logged."""
        rt = make_runtime()
        rt.pipeline = BrokenPipeline()
        verifyObject(IPipeline, rt.pipeline)
        s = Session("smtp", rt)
        self.assertEqual(s.codes(b"EHLO client.test", b"MAIL FROM:<carol@remote.test>")[-1], b"451 4.3.0")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
