"""RFC 3464 DSNs, parsed back with Python's email package."""

from __future__ import annotations

import email
import email.policy

from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue import dsn
from mailstack.queue.entry import FAILED, QueueEntry, RecipientState

HEADERS = b"Received: from x\r\nFrom: Sender <s@here.test>\r\nSubject: Hello\r\nMessage-ID: <m1@here.test>\r\n"


def make_entry() -> QueueEntry:
    e = QueueEntry(
        id="0123456789abcdef01234567",
        sender="s@here.test",
        arrival=1_700_000_000.0,
        recipients=[
            RecipientState(
                address="bad@remote.test",
                original="alias@here.test",
                local=False,
                status=FAILED,
                last_reply="550 5.1.1 <bad@remote.test>: Recipient address rejected",
                last_host="mx1.remote.test[192.0.2.1]",
                history=[{"time": 1_700_000_100.0, "host": "mx1.remote.test[192.0.2.1]", "reply": "550 5.1.1 x"}],
            ),
            RecipientState(
                address="slow@remote.test",
                original="slow@remote.test",
                local=False,
                status=FAILED,
                last_reply="451 4.4.1 Connection to the remote server failed",
                last_host="mx2.remote.test[192.0.2.2]",
            ),
        ],
    )
    return e


class DSNTests(SynchronousTestCase):
    def build(self, action="failed", **kw) -> email.message.Message:
        e = make_entry()
        data = dsn.build(
            hostname="mx.test",
            entry=e,
            recipients=e.recipients,
            action=action,
            original_headers=HEADERS,
            now=1_700_000_200.0,
            message_id="<dsn1@mx.test>",
            lifetime=86400.0,
            **kw,
        )
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))  # CRLF only
        return email.message_from_bytes(data, policy=email.policy.default)

    def test_structure(self) -> None:
        """multipart/report; report-type=delivery-status with three parts, from MAILER-DAEMON."""
        msg = self.build()
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual(msg["From"].addresses[0].addr_spec, "MAILER-DAEMON@mx.test")
        self.assertEqual(msg["To"].addresses[0].addr_spec, "s@here.test")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        parts = msg.get_payload()
        self.assertEqual(
            [p.get_content_type() for p in parts],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        self.assertIn("550 5.1.1", parts[0].get_content())
        self.assertIn("Subject: Hello", parts[2].get_payload())

    def test_fields(self) -> None:
        """Per-message and per-recipient fields of RFC 3464 section 2."""
        msg = email.message_from_bytes(self.build().as_bytes())
        groups = msg.get_payload()[1].get_payload()
        self.assertEqual(groups[0]["Reporting-MTA"], "dns; mx.test")
        self.assertEqual(groups[0]["Arrival-Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
        bad, slow = groups[1], groups[2]
        self.assertEqual(bad["Final-Recipient"], "rfc822; bad@remote.test")
        self.assertEqual(bad["Original-Recipient"], "rfc822; alias@here.test")
        self.assertEqual(bad["Action"], "failed")
        self.assertEqual(bad["Status"], "5.1.1")
        self.assertEqual(bad["Remote-MTA"], "dns; mx1.remote.test")
        self.assertEqual(bad["Diagnostic-Code"], "smtp; 550 5.1.1 <bad@remote.test>: Recipient address rejected")
        self.assertEqual(bad["Last-Attempt-Date"], "Tue, 14 Nov 2023 22:15:00 +0000")
        self.assertIsNone(slow["Original-Recipient"])
        self.assertEqual(slow["Status"], "4.4.1")

    def test_delayed(self) -> None:
        """A delay warning says delayed, and until when it is retried."""
        msg = email.message_from_bytes(self.build(action="delayed").as_bytes())
        self.assertIn("Delayed", msg["Subject"])
        group = msg.get_payload()[1].get_payload()[1]
        self.assertEqual(group["Action"], "delayed")
        self.assertEqual(group["Will-Retry-Until"], "Wed, 15 Nov 2023 22:13:20 +0000")
        self.assertIn("WARNING ONLY", msg.get_payload()[0].get_payload())

    def test_neverForNullSender(self) -> None:
        """Building a DSN for a message from <> is refused."""
        e = make_entry()
        e.sender = ""
        self.assertRaises(
            ValueError,
            dsn.build,
            hostname="mx.test",
            entry=e,
            recipients=e.recipients,
            action="failed",
            original_headers=b"",
            now=0.0,
            message_id="<x@y>",
        )

    def test_statusTable(self) -> None:
        """Status comes from the enhanced code, else from the reply class."""
        for reply, action, status in [
            ("550 5.1.1 x", "failed", "5.1.1"),
            ("554 no enhanced", "failed", "5.0.0"),
            ("451 4.4.1 down", "failed", "4.4.1"),
            ("451 4.4.1 down", "delayed", "4.4.1"),
            ("", "delayed", "4.0.0"),
            ("250 2.0.0 odd", "failed", "5.0.0"),
        ]:
            self.assertEqual(dsn.status_for(reply, action), status, reply)

    def test_headerInjection(self) -> None:
        """CR/LF in a recorded reply cannot add header fields."""
        e = make_entry()
        e.recipients[0].last_reply = "550 5.1.1 x\r\nX-Evil: 1"
        data = dsn.build(
            hostname="mx.test",
            entry=e,
            recipients=e.recipients[:1],
            action="failed",
            original_headers=b"",
            now=0.0,
            message_id="<x@y>",
        )
        self.assertNotIn(b"\r\nX-Evil", data)
