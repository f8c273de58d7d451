"""SMTP session hardening: pipelining behind DATA, the DATA time limit, logins re-checked, log escaping."""

from __future__ import annotations

import re

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailstack.errors import Reply
from tests.smtp.support import Session, make_runtime

ENVELOPE = b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
FORBID = {"forbid_unauth_pipelining": True}


class PipeliningTests(SynchronousTestCase):
    def test_unauthContentBefore354Dropped(self) -> None:
        """An unauthenticated client that sends the message before the 354 (RFC 2920
        section 3.1: DATA ends a group) gets 554 5.5.0 and is disconnected; no message begins."""
        s = Session(runtime=make_runtime(smtp=FORBID))
        out = s.send(ENVELOPE + b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        self.assertTrue(out.endswith(b"554 5.5.0 Improper command pipelining after DATA, closing connection\r\n"), out)
        self.assertNotIn(b"354", out)
        self.assertTrue(s.closed)
        self.assertEqual(s.intake.begun, [])

    def test_unauthWaitingFor354Accepted(self) -> None:
        """The same client waiting for the 354 before the content is served normally."""
        s = Session(runtime=make_runtime(smtp=FORBID))
        self.assertTrue(s.send(ENVELOPE + b"DATA\r\n").endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"))
        self.assertIn(b"250 2.0.0", s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n"))
        self.assertFalse(s.closed)

    def test_authenticatedNotDropped(self) -> None:
        """An authenticated session that pipelines the content behind DATA is not dropped."""
        s = Session("submission", make_runtime(smtp=FORBID))
        s.login()
        out = s.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nhi\r\n.\r\n")
        self.assertIn(b"354", out)
        self.assertIn(b"250 2.0.0", out)
        self.assertFalse(s.closed)

    def test_refusedDataDiscardsWhatFollows(self) -> None:
        """DATA refused (554, no valid recipient): the content sent behind it in the same
        read is discarded, never executed as commands (here an authenticated client, which
        is not dropped for pipelining)."""
        s = Session("submission", make_runtime(smtp=FORBID))
        s.login()
        out = s.send(
            b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<>\r\nDATA\r\n"
            b"RSET\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nevil\r\n.\r\n"
        )
        lines = out.split(b"\r\n")[:-1]
        self.assertEqual([line[:3] for line in lines], [b"250", b"501", b"554"], out)
        self.assertEqual(s.intake.begun, [])
        self.assertEqual(s.codes(b"NOOP"), [b"250 2.0.0"])  # in step for the next command

    def test_refusedDataDiscardsUnauthToo(self) -> None:
        """With the pipelining rule off, content behind a refused DATA is still discarded."""
        s = Session()
        out = s.send(b"EHLO c\r\nDATA\r\nNOOP\r\nNOOP\r\n")
        self.assertEqual(out.count(b"\r\n"), out.count(b"250-") + 2, out)  # EHLO lines and one 503
        self.assertIn(b"503 5.5.1", out)
        self.assertNotIn(b"250 2.0.0 Ok", out)


class DataTimeLimitTests(SynchronousTestCase):
    def test_tricklingClientCutOff(self) -> None:
        """One byte every 4 s keeps the idle timer from firing, but after smtp.data_total_timeout
        the session gets 421 4.4.2, is closed and its message aborted."""
        s = Session(runtime=make_runtime(smtp={"data_total_timeout": "60s", "data_timeout": "10s"}))
        s.send(ENVELOPE + b"DATA\r\n")
        for _ in range(14):  # 56 s
            s.clock.advance(4)
            self.assertEqual(s.send(b"x"), b"")
        self.assertFalse(s.closed)
        s.clock.advance(4)
        self.assertEqual(s.take(), b"421 4.4.2 Timeout exceeded, closing connection\r\n")
        self.assertTrue(s.closed)
        self.assertTrue(s.intake.begun[0].aborted)

    def test_limitEndsWithData(self) -> None:
        """The limit covers receiving DATA only: a session that finished its message in time
        lives on after it."""
        s = Session(runtime=make_runtime(smtp={"data_total_timeout": "60s"}))
        s.send(ENVELOPE + b"DATA\r\n")
        s.clock.advance(30)
        self.assertIn(b"250 2.0.0", s.send(b"hi\r\n.\r\n"))
        s.clock.advance(100)
        self.assertFalse(s.closed)
        self.assertEqual(s.codes(b"NOOP"), [b"250 2.0.0"])


class ReauthorisationTests(SynchronousTestCase):
    def test_deletedUserCannotStartTransaction(self) -> None:
        """A session authenticated before its user was deleted gets 530 5.7.0 at the next MAIL."""
        s = Session("submission")
        s.login()
        self.assertEqual(s.codes(b"MAIL FROM:<alice@example.org>", b"RSET"), [b"250 2.1.0", b"250 2.0.0"])
        del s.runtime.users.users[b"alice@example.org"]
        self.assertEqual(
            s.talk(b"MAIL FROM:<alice@example.org>"), [b"530 5.7.0 Authentication no longer valid; authenticate again"]
        )
        self.assertEqual(s.codes(b"MAIL FROM:<alice@example.org>"), [b"530 5.7.0"])  # the login is gone

    def test_passwordChangeVoidsLogin(self) -> None:
        """After a password change the old login cannot start a transaction; AUTH with the
        new password can."""
        import base64

        s = Session("submission")
        s.login()
        s.runtime.users.users[b"alice@example.org"] = b"new-secret"
        self.assertEqual(s.codes(b"MAIL FROM:<alice@example.org>"), [b"530 5.7.0"])
        token = base64.b64encode(b"\0alice@example.org\0new-secret")
        self.assertEqual(
            s.codes(b"AUTH PLAIN " + token, b"MAIL FROM:<alice@example.org>"), [b"235 2.7.0", b"250 2.1.0"]
        )


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class LogInjectionTests(SynchronousTestCase):
    def test_peerTextEscaped(self) -> None:
        """A check's reply echoing the client's text, and the verbs of a refused session, reach the
        log with CR, LF and ESC escaped: no logged event text holds a raw control character."""
        from mailstack.pipeline import Pipeline
        from tests.smtp.test_smtp_pipeline import Scripted

        events: list[dict] = []
        rt = make_runtime()
        rt.pipeline = Pipeline(
            [Scripted(mail=Reply(550, "5.7.1", "Not <evil\r\n\x1b[2Jforged>"))], rt.reactor, timeout=30
        )
        s = Session(runtime=rt)
        s.proto.log = Logger(observer=events.append)
        s.send(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\n")
        rt2 = make_runtime()
        rt2.pipeline = Pipeline([Scripted(connect=Reply(554, "5.7.1", "No"))], rt2.reactor, timeout=30)
        refused = Session(runtime=rt2)
        refused.proto.log = Logger(observer=events.append)
        refused.send(b"X\x1b[31mFAKE\x9b\x07 arg\r\n")
        texts = [formatEvent(e) for e in events]
        self.assertTrue(any("forged" in t for t in texts), texts)
        self.assertTrue(any("FAKE" in t for t in texts), texts)
        for t in texts:
            self.assertIsNone(CONTROL.search(t), t)
