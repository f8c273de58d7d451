"""What the SMTP client asks of the next hop for a queued message: DSN parameters and SMTPUTF8."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.smtp.extensions import Request


def make_entry() -> QueueEntry:
    r = RecipientState("b@x.test", "b@x.test", False, notify=["SUCCESS", "FAILURE"], orcpt="rfc822;B+1@x.test")
    return QueueEntry(id="Q", sender="a@y.test", arrival=0.0, recipients=[r], ret="HDRS", envid="id 1")


class RequestTests(SynchronousTestCase):
    def test_dsnOffered(self) -> None:
        """A server offering DSN gets RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT, xtext-encoded."""
        req = Request.of(make_entry())
        self.assertEqual(req.mail_params({"DSN": ""}), ["RET=HDRS", "ENVID=id+201"])
        self.assertEqual(req.rcpt_params("b@x.test", {"DSN": ""}), " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2B1@x.test")

    def test_dsnNotOffered(self) -> None:
        """Without DSN in EHLO no DSN parameter is sent (RFC 3461 5.2.1)."""
        req = Request.of(make_entry())
        self.assertEqual(req.mail_params({}), [])
        self.assertEqual(req.rcpt_params("b@x.test", {}), "")

    def test_smtputf8Flag(self) -> None:
        """The entry's SMTPUTF8 flag is carried over."""
        e = make_entry()
        e.smtputf8 = True
        self.assertTrue(Request.of(e).smtputf8)
