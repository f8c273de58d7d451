"""The queue manager: schedule, caps, retries, expiry, DSNs, restart, flush."""

from __future__ import annotations

import email
import os
import random
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.errors import Reply
from mailstack.interfaces import IDeliveryAgent, IIncoming, IIntake, IQueueCommit, IQueueKicker, IQueueStore
from mailstack.queue.bounce import DSN_HEADER_LIMIT
from mailstack.queue.entry import DELIVERED, FAILED, PENDING, QueueEntry, RecipientState
from mailstack.queue.locks import remove_entry
from mailstack.queue.manager import QueueManager
from mailstack.queue.schedule import entry_due
from mailstack.queue.store import NoSuchEntry
from tests.queue.outbound_fakes import (
    FakeAgent,
    FakeIntake,
    FakeStore,
    entry,
    make_config,
    reply_all,
    run_blocking,
)

OK = Reply(250, "2.0.0", "ok")
TEMP = Reply(451, "4.7.1", "greylisted")
PERM = Reply(550, "5.1.1", "no such user")
START = 1_000_000.0
BODY = b"Subject: x\r\n\r\nbody \xe9\r\n"


class ManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = FakeStore(self.mktemp())
        self.local = FakeAgent()
        self.remote = FakeAgent()
        self.remote.store = self.store
        self.intake = FakeIntake()
        self.config = make_config()

    def manager(self, **kw) -> QueueManager:
        m = QueueManager(
            self.store,
            self.local,
            self.remote,
            self.clock,
            self.config,
            run_blocking,
            self.intake,
            rng=random.Random(1),
            **kw,
        )
        m.startService()
        self.addCleanup(lambda: m.running and m.stopService())
        return m

    def test_interfaces(self) -> None:
        """The manager provides IQueueKicker; the fakes provide what they fake."""
        m = self.manager()
        verifyObject(IQueueKicker, m)
        verifyObject(IDeliveryAgent, self.local)
        verifyObject(IIntake, self.intake)
        verifyObject(IIncoming, self.intake.begin(None))
        verifyObject(IQueueStore, self.store)

    def test_realStoreProvidesBothSides(self) -> None:
        """QueueStore provides IQueueStore (manager, CLI) and IQueueCommit (intake)."""
        from mailstack.queue.store import QueueStore

        store = QueueStore(self.mktemp())
        verifyObject(IQueueStore, store)
        verifyObject(IQueueCommit, store)

    def test_startRecovers(self) -> None:
        """startService runs recover() and schedules what scan() finds."""
        entry(self.store, "A", "s@x.test", ["r@remote.test"], arrival=START)
        self.remote.script = reply_all(TEMP)
        m = self.manager()
        self.assertEqual(self.store.recovered, 1)
        self.assertEqual(len(self.remote.calls), 1)
        self.assertIn("A", m.scheduled())

    def test_localDeliveredAtOnce(self) -> None:
        """kick() delivers local recipients at once and removes the finished entry."""
        m = self.manager()
        entry(self.store, "L", "s@x.test", ["u@here.test"], arrival=START, local=("u@here.test",))
        m.kick("L")
        self.assertEqual(self.local.calls[0][:2], ("L", ["u@here.test"]))
        self.assertNotIn("L", self.store.envelopes)
        self.assertEqual(self.store.saves, [])
        self.assertEqual(m.scheduled(), {})

    def test_attemptPersistedBeforeConnecting(self) -> None:
        """Before the remote agent is called the attempt mark holds the next retry
        time; afterwards attempts, next_attempt and the reply are in the envelope
        and the mark went with the old envelope."""
        seen = []

        def script(e, rs):
            seen.append(dict(self.store.marks))
            return {r.address: TEMP for r in rs}

        self.remote.script = script
        m = self.manager()
        entry(self.store, "R", "s@x.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        self.assertEqual(list(seen[0]), ["R"])
        self.assertGreaterEqual(seen[0]["R"], START + 60)
        self.assertLessEqual(seen[0]["R"], START + 66)
        saved = self.store.envelopes["R"]["recipients"][0]
        self.assertEqual((saved["status"], saved["attempts"]), (PENDING, 1))
        self.assertEqual(saved["next_attempt"], seen[0]["R"])
        self.assertEqual(saved["last_reply"], "451 4.7.1 greylisted")
        self.assertEqual(self.store.marks, {})

    def test_crashKeepsMarkNotBefore(self) -> None:
        """After a crash during the attempt the mark keeps the entry from being
        retried at start; an entry without a mark is tried at once."""
        entry(self.store, "A", "s@x.test", ["r@remote.test"], arrival=START)
        entry(self.store, "B", "s@x.test", ["r@remote.test"], arrival=START)
        self.store.mark_attempt("A", START + 300)
        self.remote.script = reply_all(TEMP)
        m = self.manager()
        self.assertEqual([c[0] for c in self.remote.calls], ["B"])
        self.assertEqual(m.scheduled()["A"], START + 300)

    def test_deferredRetriedOnSchedule(self) -> None:
        """A 4xx is retried after each interval (the last repeats) and delivered once it works."""
        replies = iter([TEMP, TEMP, TEMP, TEMP, OK])
        self.remote.script = lambda e, rs: {r.address: next(replies) for r in rs}
        m = self.manager()
        entry(self.store, "R", "s@x.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        self.assertEqual(len(self.remote.calls), 1)
        for interval, calls in [(60, 2), (300, 3), (3600, 4), (3600, 5)]:
            self.clock.advance(interval - 1)
            self.assertEqual(len(self.remote.calls), calls - 1)
            self.clock.advance(interval * 0.1 + 1)
            self.assertEqual(len(self.remote.calls), calls)
        self.assertNotIn("R", self.store.envelopes)
        self.assertEqual(self.intake.messages, [])

    def test_oneTimer(self) -> None:
        """However many entries wait, one delayed call is armed, for the earliest."""
        self.remote.script = reply_all(TEMP)
        m = self.manager()
        for i in range(5):
            entry(self.store, f"R{i}", "s@x.test", [f"r@d{i}.test"], arrival=START)
            m.kick(f"R{i}")
            self.clock.advance(1)
        calls = self.clock.getDelayedCalls()
        timers = [c for c in calls if getattr(c.func, "__name__", "") == "_fire"]
        loops = [c for c in calls if c not in timers]
        self.assertEqual(len(timers), 1, calls)
        self.assertLessEqual(len(loops), 1)
        self.assertEqual(timers[0].getTime(), min(m.scheduled().values()))

    def test_permanentOneOfTwo(self) -> None:
        """5xx for one recipient: the other is delivered, one DSN names the failed one."""
        self.remote.script = lambda e, rs: {r.address: (PERM if r.address.startswith("bad") else OK) for r in rs}
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["bad@remote.test", "good@remote.test"], arrival=START)
        m.kick("R")
        self.assertEqual(len(self.remote.calls), 1, "one transaction per domain")
        self.assertEqual(len(self.intake.messages), 1)
        env, data = self.intake.messages[0]
        self.assertIsNone(env.sender)
        self.assertEqual([str(d.address) for d in env.recipients], ["s@here.test"])
        self.assertTrue(env.recipients[0].local)
        msg = email.message_from_bytes(data)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        report = msg.get_payload()[1].get_payload()
        finals = [p["Final-Recipient"] for p in report[1:]]
        self.assertEqual(finals, ["rfc822; bad@remote.test"])
        self.assertEqual(report[1]["Status"], "5.1.1")
        self.assertNotIn("R", self.store.envelopes)
        self.assertEqual(m.scheduled(), {})

    def test_doubleBounceToPostmaster(self) -> None:
        """A failed recipient of a message from <> (a bounce) is reported once, from <>, to postmaster
        of the first local domain; the entry goes."""
        self.remote.script = reply_all(PERM)
        m = self.manager()
        entry(self.store, "R", "", ["bad@remote.test"], arrival=START)
        m.kick("R")
        self.assertEqual(len(self.intake.messages), 1)
        envelope, message = self.intake.messages[0]
        self.assertIsNone(envelope.sender)
        self.assertEqual([str(d.address) for d in envelope.recipients], ["postmaster@here.test"])
        self.assertIn(b"To: <postmaster@here.test>", message)
        self.assertNotIn("R", self.store.envelopes)

    def test_noBounceOfPostmasterDoubleBounce(self) -> None:
        """A bounce for postmaster that fails goes nowhere (logged): never a loop."""
        self.remote.script = reply_all(PERM)
        m = self.manager()
        entry(self.store, "R", "", ["postmaster@here.test"], arrival=START)
        m.kick("R")
        self.assertEqual(self.intake.messages, [])
        self.assertNotIn("R", self.store.envelopes)

    def test_dsnCommitFailureRetried(self) -> None:
        """Recipients are notified only after the DSN commits; a failed commit is retried."""
        self.remote.script = reply_all(PERM)
        self.intake.fail_next = 1
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["bad@remote.test"], arrival=START)
        m.kick("R")
        self.assertEqual(self.intake.messages, [])
        saved = self.store.envelopes["R"]["recipients"][0]
        self.assertEqual((saved["status"], saved["notified"]), (FAILED, False))
        self.clock.advance(61)
        self.assertEqual(len(self.intake.messages), 1)
        self.assertEqual(len(self.remote.calls), 1, "a failed recipient is not tried again")
        self.assertNotIn("R", self.store.envelopes)

    def test_expiryBounces(self) -> None:
        """After max_queue_lifetime a deferred recipient fails and the sender gets a DSN."""
        self.config = make_config(retry_intervals=["1h"], max_queue_lifetime="3h", delay_warning_after="")
        self.remote.script = reply_all(TEMP)
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        self.clock.advance(3600 * 1.1)
        self.clock.advance(3600 * 1.1)
        self.assertEqual(self.intake.messages, [])
        self.clock.advance(3600)
        self.assertEqual(len(self.remote.calls), 4)
        self.assertEqual(len(self.intake.messages), 1)
        msg = email.message_from_bytes(self.intake.messages[0][1])
        report = msg.get_payload()[1].get_payload()
        self.assertEqual(report[1]["Action"], "failed")
        self.assertEqual(report[1]["Diagnostic-Code"], "smtp; 451 4.7.1 greylisted")
        self.assertNotIn("R", self.store.envelopes)
        self.assertEqual(m.scheduled(), {})

    def test_delayWarningOnce(self) -> None:
        """One "delayed" DSN after delay_warning_after, never a second one."""
        self.config = make_config(retry_intervals=["1h"], max_queue_lifetime="1d", delay_warning_after="150m")
        self.remote.script = reply_all(TEMP)
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        self.clock.advance(2 * 3600)
        self.assertEqual(self.intake.messages, [])
        self.clock.advance(1800)
        self.assertEqual(len(self.intake.messages), 1)
        msg = email.message_from_bytes(self.intake.messages[0][1])
        self.assertEqual(msg.get_payload()[1].get_payload()[1]["Action"], "delayed")
        self.assertTrue(self.store.envelopes["R"]["delay_warned"])
        for _ in range(10):
            self.clock.advance(3600)
        self.assertEqual(len(self.intake.messages), 1)

    def test_restartKeepsSchedule(self) -> None:
        """A new manager on the same queue keeps next_attempt: no early retry, no hot loop."""
        self.remote.script = reply_all(TEMP)
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        self.clock.advance(61 + 6)  # second attempt; next one about 300 s later
        self.assertEqual(len(self.remote.calls), 2)
        due = self.store.envelopes["R"]["recipients"][0]["next_attempt"]
        self.successResultOf(m.stopService())
        self.clock.advance(10)
        m2 = self.manager()
        self.assertEqual(len(self.remote.calls), 2, "not retried at restart")
        self.assertEqual(m2.scheduled(), {"R": due})
        self.clock.advance(due - self.clock.seconds() - 1)
        self.assertEqual(len(self.remote.calls), 2)
        self.remote.script = reply_all(OK)
        self.clock.advance(1)
        self.assertEqual(len(self.remote.calls), 3)
        self.assertNotIn("R", self.store.envelopes)

    def test_crashAfterPreSaveNoHotLoop(self) -> None:
        """A crash during the attempt leaves next_attempt in the future on disk."""
        hold = Deferred()
        self.remote.script = lambda e, rs: hold
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        # "crash": forget m; a new manager starts from what is on disk.
        m._stopping = True
        m.running = False
        self.remote.script = reply_all(TEMP)
        m2 = self.manager()
        self.assertEqual(len(self.remote.calls), 1)
        self.assertGreaterEqual(m2.scheduled()["R"], START + 60)

    def test_flushRetriesNow(self) -> None:
        """The flush trigger makes every waiting entry due at once."""
        self.remote.script = reply_all(TEMP)
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        self.clock.advance(5)
        self.assertEqual(len(self.remote.calls), 1)
        self.store.request_flush()
        self.remote.script = reply_all(OK)
        self.clock.advance(1)
        self.assertEqual(len(self.remote.calls), 2)
        self.assertNotIn("R", self.store.envelopes)

    def test_perDomainCap(self) -> None:
        """relay.max_per_domain limits simultaneous attempts to one domain."""
        self.config = make_config(max_per_domain=1, max_connections=10)
        pending: list[Deferred] = []

        def hold(e, rs):
            d = Deferred()
            pending.append(d)
            return d

        self.remote.script = hold
        m = self.manager()
        for q in ("A", "B"):
            entry(self.store, q, "s@here.test", ["r@same.test"], arrival=START)
            m.kick(q)
        entry(self.store, "C", "s@here.test", ["r@other.test"], arrival=START)
        m.kick("C")
        self.assertEqual([c[0] for c in self.remote.calls], ["A", "C"])
        pending[0].callback({"r@same.test": OK})
        self.assertEqual([c[0] for c in self.remote.calls], ["A", "C", "B"])

    def test_globalCap(self) -> None:
        """relay.max_connections limits simultaneous attempts overall."""
        self.config = make_config(max_per_domain=5, max_connections=2)
        pending: list[Deferred] = []
        self.remote.script = lambda e, rs: pending.append(Deferred()) or pending[-1]
        m = self.manager()
        for i in range(4):
            entry(self.store, f"E{i}", "s@here.test", [f"r@d{i}.test"], arrival=START)
            m.kick(f"E{i}")
        self.assertEqual(len(self.remote.calls), 2)
        pending[0].callback({"r@d0.test": OK})
        self.assertEqual(len(self.remote.calls), 3)

    def test_mixedLocalAndRemote(self) -> None:
        """Local recipients are delivered while the remote one is deferred; only it is retried."""
        self.remote.script = reply_all(TEMP)
        m = self.manager()
        entry(self.store, "M", "s@here.test", ["u@here.test", "r@remote.test"], arrival=START, local=("u@here.test",))
        m.kick("M")
        self.assertEqual(len(self.local.calls), 1)
        recips = {r["address"]: r["status"] for r in self.store.envelopes["M"]["recipients"]}
        self.assertEqual(recips, {"u@here.test": DELIVERED, "r@remote.test": PENDING})
        self.clock.advance(70)
        self.assertEqual(len(self.local.calls), 1)
        self.assertEqual(len(self.remote.calls), 2)

    def test_deletedWhileDelivering(self) -> None:
        """An entry deleted during an attempt is not written back."""
        hold = Deferred()
        self.remote.script = lambda e, rs: hold
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        self.store.remove("R")
        hold.callback({"r@remote.test": TEMP})
        self.assertNotIn("R", self.store.envelopes)
        self.assertEqual(m.scheduled(), {})

    def test_kickWhileActive(self) -> None:
        """A kick during a round makes the manager look again right after it."""
        hold = Deferred()
        self.remote.script = lambda e, rs: hold
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        m.kick("R")
        self.remote.script = reply_all(TEMP)
        hold.callback({"r@remote.test": TEMP})
        self.assertEqual(len(self.remote.calls), 1, "remote not due again: next_attempt is later")
        self.assertGreater(m.scheduled()["R"], START + 59)

    def test_stopWaitsForInFlight(self) -> None:
        """stopService waits for attempts in flight, but at most stop_timeout."""
        hold = Deferred()
        self.remote.script = lambda e, rs: hold
        m = self.manager(stop_timeout=5)
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        d = m.stopService()
        self.assertNoResult(d)
        self.assertEqual((self.remote.closed, self.remote.aborted), (1, 0))  # idle ones closed, none aborted
        hold.callback({"r@remote.test": OK})
        self.successResultOf(d)
        self.assertNotIn("R", self.store.envelopes)
        self.clock.advance(5)
        self.assertEqual(self.remote.aborted, 0)

    def test_stopTimeout(self) -> None:
        """A stuck attempt does not hold shutdown beyond stop_timeout; then every
        agent aborts its connections (in-flight relays are dropped, not left open)."""
        self.remote.script = lambda e, rs: Deferred()
        m = self.manager(stop_timeout=5)
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        d = m.stopService()
        self.assertNoResult(d)
        self.clock.advance(4.9)
        self.assertEqual((self.remote.aborted, self.local.aborted), (0, 0))
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual((self.remote.aborted, self.local.aborted), (1, 1))

    def test_agentErrorIsTemporary(self) -> None:
        """An exception from an agent counts as a temporary failure."""

        def boom(e, rs):
            raise RuntimeError("bug")

        self.remote.script = boom
        m = self.manager()
        entry(self.store, "R", "s@here.test", ["r@remote.test"], arrival=START)
        m.kick("R")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        saved = self.store.envelopes["R"]["recipients"][0]
        self.assertEqual(saved["status"], PENDING)
        self.assertTrue(saved["last_reply"].startswith("451"))


class EntryDueTests(SynchronousTestCase):
    def test_table(self) -> None:
        """entry_due: earliest pending next_attempt, warning time, or now for bounces/removal."""
        store = FakeStore(self.mktemp())
        e = entry(store, "A", "s@x", ["a@x", "b@x"], arrival=100)
        e.recipients[0].next_attempt = 500
        e.recipients[1].next_attempt = 300
        self.assertEqual(entry_due(e, 200, None), 300)
        self.assertEqual(entry_due(e, 200, 150), 250)
        e.delay_warned = True
        self.assertEqual(entry_due(e, 200, 150), 300)
        e.recipients[1].status = FAILED
        self.assertEqual(entry_due(e, 200, None), 200)
        e.recipients[1].notified = True
        self.assertEqual(entry_due(e, 200, None), 500)
        e.recipients[0].status = DELIVERED
        self.assertEqual(entry_due(e, 200, None), 200)


class RealStoreMixin:
    """A QueueManager over the real QueueStore, its remote agent answering ``remote_reply``."""

    remote_reply = TEMP

    def setUp(self) -> None:
        from mailstack.queue.store import QueueStore

        self.clock = Clock()
        self.clock.advance(START)
        self.store = QueueStore(os.path.abspath(self.mktemp()))  # type: ignore[attr-defined]
        self.store.recover()
        self.remote = FakeAgent(reply_all(self.remote_reply))
        self.intake = FakeIntake()

    def commit(self, rcpt: str = "r@remote.test", **fields: Any) -> str:
        from mailstack.queue.entry import QueueEntry, RecipientState

        qid = self.store.new_id()
        with self.store.open_tmp(qid) as f:
            f.write(b"Subject: x\r\n\r\nbody\r\n")
        rs = RecipientState(address=rcpt, original=rcpt, local=False, **fields)
        self.store.commit(QueueEntry(id=qid, sender="s@here.test", arrival=START, recipients=[rs]))
        return qid

    def manager(self, **kw: Any) -> QueueManager:
        m = QueueManager(
            self.store,
            FakeAgent(),
            self.remote,
            self.clock,
            make_config(),
            run_blocking,
            self.intake,
            rng=random.Random(2),
            **kw,
        )
        m.startService()
        self.addCleanup(lambda: m.running and m.stopService())  # type: ignore[attr-defined]
        return m


class RealStoreTests(RealStoreMixin, SynchronousTestCase):
    """The manager over the real QueueStore (files, locks, scan)."""

    def commit_inline(self, rcpt: str = "r@remote.test", local: bool = False) -> str:
        """An entry whose message is inside its envelope, as the intake queues a small message."""
        qid = self.store.new_id()
        rs = RecipientState(address=rcpt, original=rcpt, local=local)
        self.store.commit(QueueEntry(id=qid, sender="s@here.test", arrival=START, recipients=[rs]), BODY)
        return qid

    def test_inlineMessageRelayedFromTheEnvelope(self) -> None:
        """The remote agent gets the bytes stored inside the envelope (one read for both); once delivered the
        entry's one file is gone."""
        self.remote.script = reply_all(OK)
        qid = self.commit_inline()
        m = self.manager()
        m.kick(qid)
        self.assertEqual(self.remote.messages, [BODY])
        self.assertEqual(list(self.store.scan()), [])
        self.assertEqual(os.listdir(os.path.join(self.store.root, "env")), [])

    def test_inlineMessageToTheLocalAgent(self) -> None:
        """A local recipient of an inline entry: the local agent gets the bytes (there is no message file)."""
        local = FakeAgent()
        qid = self.commit_inline("u@here.test", local=True)
        m = QueueManager(self.store, local, self.remote, self.clock, make_config(), run_blocking, self.intake)
        m.startService()
        self.addCleanup(m.stopService)
        m.kick(qid)
        self.assertEqual(local.messages, [BODY])
        self.assertEqual(list(self.store.scan()), [])

    def test_retryKeepsInlineMessage(self) -> None:
        """After a temporary failure the saved envelope still holds the message; the retry relays it."""
        qid = self.commit_inline()
        m = self.manager()
        m.kick(qid)
        entry, message = self.store.load_message(qid)
        self.assertEqual((entry.recipients[0].attempts, message), (1, BODY))
        self.remote.script = reply_all(OK)
        self.clock.advance(entry.recipients[0].next_attempt - self.clock.seconds())
        self.assertEqual(self.remote.messages, [BODY, BODY])
        self.assertEqual(list(self.store.scan()), [])

    def test_scanMovesAsideEnvelopeWithoutMessage(self) -> None:
        """At start-up an envelope with no message inside and no msg/<id> goes to corrupt/, unscheduled."""
        qid = self.commit()
        os.unlink(self.store.message_path(qid))
        m = self.manager()
        self.assertEqual(m.scheduled(), {})
        self.assertEqual(self.store.ids(), [])
        self.assertIn(qid + ".json", os.listdir(os.path.join(self.store.root, "corrupt")))

    def test_restartKeepsSchedule(self) -> None:
        """Attempt state is in env/<id>.json; a new manager schedules from it."""
        qid = self.commit()
        m = self.manager()
        m.kick(qid)
        saved = self.store.load(qid).recipients[0]
        self.assertEqual(saved.attempts, 1)
        self.successResultOf(m.stopService())
        m2 = self.manager()
        self.assertEqual(m2.scheduled(), {qid: saved.next_attempt})
        self.assertEqual(len(self.remote.calls), 1)

    def test_deleteDuringAttempt(self) -> None:
        """`queue delete` during an attempt: the entry stays deleted."""
        hold = Deferred()
        self.remote.script = lambda e, rs: hold
        qid = self.commit()
        m = self.manager()
        m.kick(qid)
        self.assertTrue(remove_entry(self.store, qid))
        hold.callback({"r@remote.test": TEMP})
        self.assertEqual(list(self.store.scan()), [])
        self.assertFalse(os.path.exists(self.store.message_path(qid)))
        self.assertEqual(m.scheduled(), {})

    def test_flushTrigger(self) -> None:
        """request_flush() (the admin command) makes the running manager retry now."""
        qid = self.commit()
        m = self.manager()
        m.kick(qid)
        self.clock.advance(5)
        self.store.request_flush()
        self.remote.script = reply_all(OK)
        self.clock.advance(1)
        self.assertEqual(len(self.remote.calls), 2)
        self.assertEqual(list(self.store.scan()), [])

    def test_holdAndRelease(self) -> None:
        """A held entry is never tried, not even by a flush, stays counted in the
        queue gauge, and its expiry clock stops; release (a kick request) makes the
        running manager try it at once."""
        from mailstack.metrics import Metrics
        from mailstack.queue import hold

        qid = self.commit()
        metrics = Metrics()
        m = self.manager(metrics=metrics)
        self.assertEqual(len(self.remote.calls), 1)
        self.assertTrue(hold.hold(self.store, qid, self.clock.seconds()))
        self.assertFalse(hold.hold(self.store, qid, self.clock.seconds()))
        self.clock.advance(3600)  # past its retry time
        self.store.request_flush()
        self.clock.advance(1)
        self.assertEqual(len(self.remote.calls), 1)
        self.assertEqual(m.queue_stats().entries, 1)
        self.assertIn("mailstack_queue_entries 1.0", metrics.exposition().decode())
        self.clock.advance(6 * 86400)  # longer than the queue lifetime (5d), all of it held
        self.remote.script = reply_all(TEMP)
        self.assertTrue(hold.release(self.store, qid, self.clock.seconds()))
        self.clock.advance(1)
        self.assertEqual(len(self.remote.calls), 2)
        (rcpt,) = self.store.load(qid).recipients
        self.assertEqual(rcpt.status, "pending")  # deferred, not expired: the held days do not count
        self.assertGreater(self.store.load(qid).held_time, 6 * 86400)

    def test_heldAtStartIsNotScheduled(self) -> None:
        """A held entry found by the start-up scan is kept aside, not scheduled."""
        from mailstack.queue import hold

        qid = self.commit()
        hold.hold(self.store, qid, START)
        m = self.manager()
        self.assertEqual(m.scheduled(), {})
        self.assertEqual(m.queue_stats().entries, 1)
        self.assertEqual(self.remote.calls, [])

    def test_holdDuringAttemptSurvivesItsSave(self) -> None:
        """A hold written while an attempt runs is kept by the attempt's save."""
        from mailstack.queue import hold

        pending = Deferred()
        self.remote.script = lambda e, rs: pending
        qid = self.commit()
        m = self.manager()
        m.kick(qid)
        hold.hold(self.store, qid, START + 1)
        pending.callback({"r@remote.test": TEMP})
        self.assertTrue(self.store.load(qid).held)
        self.assertEqual(m.queue_stats().entries, 1)


class LogTests(SynchronousTestCase):
    def test_oneEventPerAttemptAndRecipient(self) -> None:
        """Each attempt logs one event per recipient with queue_id, rcpt, mx, ip, reply, delay, status."""
        from twisted.logger import capturedLogs

        from mailstack.delivery.replies import RemoteReply

        clock = Clock()
        clock.advance(START)
        store = FakeStore(self.mktemp())
        sent = RemoteReply(250, "2.0.0", "ok", host="mx1.r.test", ip="192.0.2.1")
        bad = RemoteReply(550, "5.1.1", "no", host="mx1.r.test", ip="192.0.2.1")
        remote = FakeAgent(lambda e, rs: {r.address: (bad if r.address.startswith("b") else sent) for r in rs})
        m = QueueManager(store, FakeAgent(), remote, clock, make_config(), run_blocking, FakeIntake())
        m.startService()
        entry(store, "R", "s@here.test", ["a@r.test", "b@r.test"], arrival=START - 5)
        with capturedLogs() as events:
            m.kick("R")
        attempts = [e for e in events if "rcpt" in e]
        self.assertEqual(
            [(e["queue_id"], e["rcpt"], e["mx"], e["ip"], e["status"], e["reply"], e["delay"]) for e in attempts],
            [
                ("R", "a@r.test", "mx1.r.test", "192.0.2.1", "sent", "250 2.0.0 ok", 5.0),
                ("R", "b@r.test", "mx1.r.test", "192.0.2.1", "bounced", "550 5.1.1 no", 5.0),
            ],
        )
        rec = store.envelopes
        self.assertEqual(rec, {})
        m.stopService()


class DSNRoutingTests(SynchronousTestCase):
    def setUp(self) -> None:
        from mailstack.address import parse_address
        from mailstack.envelope import Destination
        from mailstack.errors import PermanentFailure

        self.clock = Clock()
        self.clock.advance(START)
        self.store = FakeStore(self.mktemp())
        self.intake = FakeIntake()

        class Router:
            def resolve(self, address, authenticated):
                if address.key == "alias@here.test":
                    target = parse_address("real@here.test")
                    return [Destination(address=target, original=address, local=True)]
                raise PermanentFailure(Reply(550, "5.1.1", "unknown"))

        self.manager = QueueManager(
            self.store,
            FakeAgent(),
            FakeAgent(reply_all(PERM)),
            self.clock,
            make_config(),
            run_blocking,
            self.intake,
            router=Router(),
        )
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def test_localSenderThroughRouter(self) -> None:
        """A DSN to a local sender follows its alias."""
        entry(self.store, "A", "alias@here.test", ["x@remote.test"], arrival=START)
        self.manager.kick("A")
        ((env, _),) = self.intake.messages
        self.assertEqual([str(d.address) for d in env.recipients], ["real@here.test"])

    def test_unknownLocalSender(self) -> None:
        """A forged local sender that is no mailbox gets no DSN; the entry still goes."""
        entry(self.store, "B", "forged@here.test", ["x@remote.test"], arrival=START)
        self.manager.kick("B")
        self.assertEqual(self.intake.messages, [])
        self.assertNotIn("B", self.store.envelopes)


class BackscatterTests(SynchronousTestCase):
    def test_forwardedBounceCarriesCappedHeadersOnly(self) -> None:
        """A message forwarded to a remote alias target for an unauthenticated sender
        fails: the DSN carries the original headers only (text/rfc822-headers), at
        most DSN_HEADER_LIMIT bytes of them, and none of the body -- however many
        header lines (871 here) the sender stuffed into it."""
        clock = Clock()
        clock.advance(START)
        store = FakeStore(self.mktemp())
        intake = FakeIntake()
        manager = QueueManager(
            store, FakeAgent(), FakeAgent(reply_all(PERM)), clock, make_config(), run_blocking, intake
        )
        manager.startService()
        self.addCleanup(manager.stopService)
        headers = b"".join(b"X-Attack-%03d: %s\r\n" % (i, b"A" * 60) for i in range(871))
        body = b"BODY-PAYLOAD " * 20000
        rcpt = RecipientState(address="target@remote.test", original="fwd@here.test", local=False)
        store.add(
            QueueEntry(id="F", sender="victim@elsewhere.test", arrival=START, recipients=[rcpt]),
            b"Subject: spam\r\n" + headers + b"\r\n" + body,
        )
        manager.kick("F")
        ((env, dsn_bytes),) = intake.messages
        self.assertEqual([str(d.address) for d in env.recipients], ["victim@elsewhere.test"])
        msg = email.message_from_bytes(dsn_bytes)
        parts = [p for p in msg.walk() if not p.is_multipart()]
        self.assertEqual(parts[-1].get_content_type(), "text/rfc822-headers")
        returned = parts[-1].get_payload(decode=True)
        self.assertLessEqual(len(returned), DSN_HEADER_LIMIT)
        self.assertIn(b"X-Attack-000", returned)
        self.assertNotIn(b"X-Attack-870", returned)
        self.assertNotIn(b"BODY-PAYLOAD", dsn_bytes)
        self.assertLess(len(dsn_bytes), DSN_HEADER_LIMIT + 8192)


class DeliveryLogTests(SynchronousTestCase):
    def test_remoteReplyAndHostEscaped(self) -> None:
        """The per-recipient delivery log line shows a remote reply and MX name with
        control characters escaped (logsafe), so a server cannot forge log lines."""
        from twisted.logger import globalLogPublisher

        from mailstack.delivery.replies import RemoteReply

        seen: list = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        clock = Clock()
        clock.advance(START)
        store = FakeStore(self.mktemp())
        evil = RemoteReply(451, "4.0.0", "busy\r\nFAKE: delivered\x1b[2J", host="mx\n.r.test", ip="192.0.2.1")
        manager = QueueManager(
            store, FakeAgent(), FakeAgent(reply_all(evil)), clock, make_config(), run_blocking, FakeIntake()
        )
        manager.startService()
        self.addCleanup(manager.stopService)
        entry(store, "L", "s@here.test", ["x@remote.test"], arrival=START)
        manager.kick("L")
        lines = [e["line"] for e in seen if "line" in e and "to=<x@remote.test>" in e["line"]]
        self.assertEqual(len(lines), 1)
        self.assertNotIn("\n", lines[0])
        self.assertNotIn("\x1b", lines[0])
        self.assertIn("\\r\\nFAKE", lines[0])


class FastPathTests(RealStoreMixin, SynchronousTestCase):
    """The relay fast path and the start-up scan over the real QueueStore."""

    remote_reply = OK

    def test_preAttemptMarkNoFsync(self) -> None:
        """The attempt is recorded in the envelope's mtime, with no fsync and no file
        created; a delivered entry is removed without an env/ fsync (a crash can only
        cause a second delivery)."""
        from mailstack.storage import fsutil

        qid = self.commit()
        synced: list[str] = []
        real = fsutil.fsync_dir
        self.patch(fsutil, "fsync_dir", lambda p: (synced.append(os.path.basename(p)), real(p))[1])
        seen = []

        def script(e, rs):
            mtime = os.stat(self.store.envelope_path(qid)).st_mtime
            seen.append((len(synced), mtime, sorted(os.listdir(self.store.root))))
            return {r.address: OK for r in rs}

        self.remote.script = script
        before = sorted(os.listdir(self.store.root))
        m = self.manager()
        synced_then, mark, listing = seen[0]
        self.assertGreater(mark, self.clock.seconds() + 30)  # the next retry time, on disk before the agent ran
        self.assertEqual(listing, before)  # no marker file anywhere
        self.assertEqual(synced.count("env"), 1)  # recover()'s at start, none for the mark or removal
        self.assertEqual(self.store.ids(), [])
        self.assertFalse(os.path.exists(self.store.message_path(qid)))
        self.assertEqual(m.scheduled(), {})

    def test_markSurvivesRestartUntilSaved(self) -> None:
        """A real store: mark_attempt sets the envelope's mtime, a new manager honours
        it, and a save (a new envelope) drops it."""
        qid = self.commit()
        self.assertEqual(self.store.attempt_mark(qid), 0.0)  # a freshly written envelope is no mark
        later = float(int(time.time()) + 600)
        self.store.mark_attempt(qid, later)
        self.assertEqual(self.store.attempt_mark(qid), later)
        self.clock.advance(later - 300 - self.clock.seconds())  # a process restart well before the mark
        m = self.manager()
        self.assertEqual(self.remote.calls, [])
        self.assertEqual(m.scheduled(), {qid: later})
        self.store.save(self.store.load(qid))
        self.assertEqual(self.store.attempt_mark(qid), 0.0)
        self.assertRaises(NoSuchEntry, self.store.mark_attempt, "f" * 24, later)

    def test_bouncedRemovalDurable(self) -> None:
        """An entry whose DSN was sent is removed with an env/ fsync (no second DSN)."""
        from mailstack.storage import fsutil

        self.remote.script = reply_all(PERM)
        self.commit()
        synced: list[str] = []
        real = fsutil.fsync_dir
        self.patch(fsutil, "fsync_dir", lambda p: (synced.append(os.path.basename(p)), real(p))[1])
        self.manager()
        self.assertEqual(len(self.intake.messages), 1)
        self.assertEqual(self.store.ids(), [])
        self.assertEqual(synced.count("env"), 2)  # recover() and the removal

    def test_startScanInBatches(self) -> None:
        """At start the schedule is read in batches of SCAN_BATCH envelopes; what is
        due is delivered, what is deferred keeps its next_attempt."""
        from mailstack.queue import manager as manager_mod

        self.patch(manager_mod, "SCAN_BATCH", 2)
        later = [self.commit(attempts=1, next_attempt=START + 600 + i) for i in range(3)]
        now = [self.commit() for _ in range(2)]
        m = self.manager()
        self.assertEqual(m.scheduled(), {qid: START + 600 + i for i, qid in enumerate(later)})
        self.assertEqual(sorted(c[0] for c in self.remote.calls), sorted(now))

    def test_startScanDamagedEnvelope(self) -> None:
        """recover() no longer reads envelopes; the start-up scan moves an unreadable
        one to corrupt/ and schedules the rest."""
        bad = self.commit(attempts=1, next_attempt=START + 600)
        good = self.commit(attempts=1, next_attempt=START + 700)
        with open(self.store.envelope_path(bad), "wb") as f:
            f.write(b"\x00garbage")
        m = self.manager()
        self.assertEqual(m.scheduled(), {good: START + 700})
        self.assertIn(bad + ".json", os.listdir(os.path.join(self.store.root, "corrupt")))

    def test_scanScheduleMatchesEntryDue(self) -> None:
        """scan_schedule (dict fast path) gives entry_due's answer for each state."""
        from mailstack.queue.scan import scan_schedule

        qids = [
            self.commit(attempts=1, next_attempt=START + 60),
            self.commit(status=DELIVERED),
            self.commit(status=FAILED),
            self.commit(status=FAILED, notified=True),
        ]
        for warn in (None, 30.0, 3600.0):
            expected = [(entry_due(self.store.load(q), START + 5, warn), q) for q in qids]
            self.assertEqual(scan_schedule(self.store, qids, START + 5, warn), expected)
        os.unlink(self.store.envelope_path(qids[0]))  # removed since the listing
        self.assertEqual([q for _, q in scan_schedule(self.store, qids, START, None)], qids[1:])

    def test_fileWorkBatched(self) -> None:
        """Loads and removals that pile up while a thread call runs go together in the
        next one: one hand-off per batch, not one per message and kind."""
        from twisted.internet.defer import maybeDeferred

        calls: list = []

        def held(f, *a, **kw):
            d: Deferred = Deferred()
            calls.append(((f, a, kw), d))
            return d

        def release() -> None:
            (f, a, kw), d = calls.pop(0)
            maybeDeferred(f, *a, **kw).chainDeferred(d)

        def pending() -> list:
            """The items of the thread calls not yet run, as (kind, id)."""
            return [[(g.__name__.strip("_"), args[0]) for g, *args in a[0]] for (f, a, _), _ in calls]

        m = QueueManager(
            self.store,
            FakeAgent(),
            self.remote,
            self.clock,
            make_config(),
            held,
            self.intake,
            rng=random.Random(2),
            flush_poll=0,
        )
        m.startService()
        while calls:  # the start-up scan
            release()
        q1, q2, q3 = (self.commit() for _ in range(3))
        for qid in (q1, q2, q3):
            m.kick(qid)
        self.assertEqual(pending(), [[("begin", q1)]])
        release()  # q1 is delivered; its removal waits behind the loads of q2 and q3
        self.assertEqual(pending(), [[("begin", q2), ("begin", q3)]])
        q4 = self.commit()
        m.kick(q4)
        release()
        self.assertEqual(pending(), [[("remove", q1), ("begin", q4)]])
        while calls:
            release()
        self.assertEqual(sorted(c[0] for c in self.remote.calls), sorted([q1, q2, q3, q4]))
        self.assertEqual(self.store.ids(), [])
        m.stopService()
