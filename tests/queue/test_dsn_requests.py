"""RFC 3461 DSN requests in the queue: NOTIFY, RET, ENVID and ORCPT decide which notices go out and what they say."""

from __future__ import annotations

import email
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.errors import Reply
from mailstack.queue.entry import QueueEntry, RecipientState, well_formed
from mailstack.queue.manager import QueueManager
from tests.queue.outbound_fakes import (
    FakeAgent,
    FakeIntake,
    FakeStore,
    make_config,
    reply_all,
    run_blocking,
)

PERM = Reply(550, "5.1.1", "no such user")
TEMP = Reply(451, "4.7.1", "try later")
START = 1_000_000.0


class RequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = FakeStore(self.mktemp())
        self.local = FakeAgent()
        self.remote = FakeAgent()
        self.remote.store = self.store
        self.intake = FakeIntake()

    def run_entry(self, notify: list[str], local: bool = False, **fields: object) -> None:
        m = QueueManager(self.store, self.local, self.remote, self.clock, make_config(), run_blocking, self.intake,
                         rng=random.Random(1))
        m.startService()
        self.addCleanup(lambda: m.running and m.stopService())
        rcpt = "bob@here.test" if local else "bad@remote.test"
        r = RecipientState(address=rcpt, original=rcpt, local=local, notify=notify, orcpt=str(fields.pop("orcpt", "")))
        self.store.add(QueueEntry(id="R", sender="s@here.test", arrival=START, recipients=[r], **fields))  # type: ignore[arg-type]
        m.kick("R")

    def report(self) -> email.message.Message:
        self.assertEqual(len(self.intake.messages), 1)
        return email.message_from_bytes(self.intake.messages[0][1])

    def test_never(self) -> None:
        """NOTIFY=NEVER: no bounce, the entry goes."""
        self.remote.script = reply_all(PERM)
        self.run_entry(["NEVER"])
        self.assertEqual(self.intake.messages, [])
        self.assertNotIn("R", self.store.envelopes)

    def test_noDelay(self) -> None:
        """NOTIFY=FAILURE: no delay warning even long after arrival."""
        self.remote.script = reply_all(TEMP)
        self.run_entry(["FAILURE"])
        self.clock.advance(5 * 3600)
        self.assertEqual(self.intake.messages, [])

    def test_successLocal(self) -> None:
        """NOTIFY=SUCCESS on local delivery: one DSN with Action: delivered, ENVID and ORCPT echoed."""
        self.run_entry(["SUCCESS"], local=True, envid="env-1")
        self.assertNotIn("R", self.store.envelopes)
        msg = self.report()
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        status = msg.get_payload()[1].get_payload()
        self.assertEqual(status[0]["Original-Envelope-Id"], "env-1")
        self.assertEqual(status[1]["Action"], "delivered")
        self.assertEqual(status[1]["Status"], "2.0.0")

    def test_orcptEchoed(self) -> None:
        """ORCPT is echoed as Original-Recipient; RET=HDRS returns headers only."""
        self.remote.script = reply_all(PERM)
        self.run_entry([], orcpt="rfc822;Orig@Example.NET", ret="HDRS")
        msg = self.report()
        self.assertEqual(msg.get_payload()[1].get_payload()[1]["Original-Recipient"], "rfc822; Orig@Example.NET")
        self.assertEqual(msg.get_payload()[2].get_content_type(), "text/rfc822-headers")


class FormatTests(SynchronousTestCase):
    def test_compatible(self) -> None:
        """Without DSN/SMTPUTF8 data the JSON has exactly the previous keys; with them they round-trip;
        an entry written before they existed still reads."""
        e = QueueEntry(id="Q", sender="a@b", arrival=1.0, recipients=[RecipientState("c@d", "c@d", False)])
        old = e.to_json()
        self.assertNotIn("ret", old)
        self.assertNotIn("notify", old["recipients"][0])
        self.assertTrue(well_formed(old, "Q"))
        e.ret, e.envid, e.smtputf8 = "HDRS", "x", True
        e.recipients[0].notify, e.recipients[0].orcpt = ["SUCCESS"], "rfc822;c@d"
        data = e.to_json()
        self.assertTrue(well_formed(data, "Q"))
        self.assertEqual(QueueEntry.from_json(data), e)
        data["recipients"][0]["notify"] = "SUCCESS"
        self.assertFalse(well_formed(data, "Q"))
