"""Tests for mailstack.procs.slots, the slots kept by procs.stateserver, and the master's
end of a worker's AMP connection."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack.connlimit import PER_IP, TOTAL, ConnectionLimiter
from mailstack.interfaces import IConnectionSlots, IQueueKicker
from mailstack.procs.commands import Ready, ReleaseSlot
from mailstack.procs.master import MasterChannel
from mailstack.procs.slots import KICKS_PER_MESSAGE, LEASE, LeasedSlots, RemoteKicker
from mailstack.procs.stateserver import StateServer
from mailstack.procs.worker import WorkerChannel
from tests.support.fakes import FakeThrottle


@implementer(IQueueKicker)
class RecordingKicker:
    def __init__(self) -> None:
        self.kicked: list[str] = []

    def kick(self, queue_id: str) -> None:
        self.kicked.append(queue_id)


class MasterWorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.limiters = {"smtp": ConnectionLimiter(3, 2), "submission": ConnectionLimiter(100, 40)}
        self.kicker = RecordingKicker()
        verifyObject(IQueueKicker, self.kicker)
        self.ready: list[int] = []
        self.state = StateServer(FakeThrottle(), None, limiters=self.limiters)  # type: ignore[arg-type]
        self.links: list[tuple[Any, MemoryReactorClock]] = []

    def link(self, index: int = 0) -> tuple[WorkerChannel, MasterChannel, Any]:
        """A worker's AMP connection to its master channel, pumped in memory."""
        channel = MasterChannel(index, self.kicker, self.ready.append, self.state.worker())
        reactor = MemoryReactorClock()
        worker, master, pump = connectedServerAndClient(lambda: channel, lambda: WorkerChannel(reactor))
        self.links.append((pump, reactor))
        return worker, master, pump

    def two_workers(self, kind: str) -> tuple[LeasedSlots, Any, LeasedSlots, Any]:
        """Two workers' slots of ``kind``, each with the pump of its link to the master."""
        w1, _, p1 = self.link(0)
        w2, _, p2 = self.link(1)
        return w1.leases.slots(kind), p1, w2.leases.slots(kind), p2

    def settle(self) -> None:
        """Deliver everything on every link, ending each worker's reactor turn, until quiet."""
        for _ in range(4):
            for pump, reactor in self.links:
                pump.flush()
                reactor.advance(0)

    def acquire(self, slots: LeasedSlots, pump: Any, host: str) -> str | None:
        """``slots.acquire(host)``, answered (a refusal asks the other workers first)."""
        d = slots.acquire(host)
        pump.flush()
        self.settle()
        return self.successResultOf(d)

    def test_capsHoldAcrossWorkers(self) -> None:
        """Slots taken through two workers count against one cap; a released one is free again."""
        s1, p1, s2, p2 = self.two_workers("smtp")
        verifyObject(IConnectionSlots, s1)
        self.assertIsNone(self.acquire(s1, p1, "192.0.2.1"))
        self.assertIsNone(self.acquire(s2, p2, "192.0.2.1"))
        self.assertEqual(self.acquire(s2, p2, "192.0.2.1"), PER_IP)
        self.assertIsNone(self.acquire(s1, p1, "192.0.2.2"))
        self.assertEqual(self.acquire(s2, p2, "192.0.2.3"), TOTAL)
        s1.release("192.0.2.1")
        p1.flush()
        self.assertIsNone(self.acquire(s2, p2, "192.0.2.3"))

    def test_lostWorkerGivesItsSlotsBack(self) -> None:
        """When a worker's connection is lost (it died), every slot it held is given back, no other."""
        w1, _, p1 = self.link(0)
        w2, _, p2 = self.link(1)
        for _ in range(2):
            self.acquire(w1.leases.slots("smtp"), p1, "192.0.2.1")
        self.acquire(w2.leases.slots("smtp"), p2, "192.0.2.2")
        self.acquire(w1.leases.slots("submission"), p1, "192.0.2.1")  # with spares
        self.assertEqual(self.limiters["smtp"].total, 3)
        w1.transport.loseConnection()
        p1.flush()
        self.assertEqual((self.limiters["smtp"].total, dict(self.limiters["smtp"].per_ip)), (1, {"192.0.2.2": 1}))
        self.assertEqual(self.limiters["submission"].total, 0)

    def test_slotGrantedAfterTheWorkerLeftGoesBack(self) -> None:
        """A slot granted to a worker whose connection is already gone is given back at once."""
        held = self.state.worker()
        held.lost()
        answer = self.successResultOf(held.acquire_slot("submission", "192.0.2.1"))
        self.assertEqual(answer, {"over": "", "spares": 0})
        self.assertEqual(self.limiters["submission"].total, 0)

    def test_releaseOfASlotNotHeldIsIgnored(self) -> None:
        """A release the worker does not hold cannot push the master's counts below the truth."""
        w1, _, p1 = self.link(0)
        w2, _, p2 = self.link(1)
        self.acquire(w1.leases.slots("smtp"), p1, "192.0.2.1")
        w2.callRemote(ReleaseSlot, kind="smtp", host="192.0.2.1", count=1)
        p2.flush()
        self.assertEqual(self.limiters["smtp"].total, 1)

    def test_kickReachesTheQueueManager(self) -> None:
        """A worker's kicks are the master's queue manager's kicks, those of one reactor turn
        sent together at its end, in order."""
        worker, _, pump = self.link()
        clock = Clock()
        kicker = RemoteKicker(worker, clock)
        verifyObject(IQueueKicker, kicker)
        sent: list[Any] = []
        real = worker.callRemote
        worker.callRemote = lambda command, **kw: sent.append(kw) or real(command, **kw)  # type: ignore[method-assign]
        kicker.kick("q1")
        kicker.kick("q2")
        pump.flush()
        self.assertEqual(self.kicker.kicked, [])
        clock.advance(0)
        pump.flush()
        self.assertEqual((self.kicker.kicked, len(sent)), (["q1", "q2"], 1))

    def test_manyKicksSplitOverMessages(self) -> None:
        """A turn's kicks beyond what one AMP message holds go in several, all delivered."""
        worker, _, pump = self.link()
        clock = Clock()
        kicker = RemoteKicker(worker, clock)
        ids = [f"{i:024x}" for i in range(2 * KICKS_PER_MESSAGE + 1)]
        for queue_id in ids:
            kicker.kick(queue_id)
        clock.advance(0)
        pump.flush()
        self.assertEqual(self.kicker.kicked, ids)

    def test_kickWithTheMasterGoneIsLogged(self) -> None:
        """A kick when the master is gone does not raise into the intake."""
        worker, _, pump = self.link()
        clock = Clock()
        kicker = RemoteKicker(worker, clock)
        worker.transport.loseConnection()
        pump.flush()
        kicker.kick("q1")
        clock.advance(0)  # must not raise
        self.flushLoggedErrors()

    def test_readyNamesTheWorker(self) -> None:
        """Ready tells the pool which worker listens."""
        worker, _, pump = self.link(3)
        d = worker.callRemote(Ready)
        pump.flush()
        self.successResultOf(d)
        self.assertEqual(self.ready, [3])

    def test_releaseWithTheMasterGoneIsLogged(self) -> None:
        """Giving a slot back when the master is gone does not raise into the session."""
        worker, _, pump = self.link()
        slots = worker.leases.slots("smtp")
        self.acquire(slots, pump, "192.0.2.1")
        worker.transport.loseConnection()
        pump.flush()
        slots.release("192.0.2.1")  # must not raise
        self.flushLoggedErrors()

    def test_sparesServeTheNextSessionsWithoutAsking(self) -> None:
        """Far below the caps the master lends spare slots with the first, counted against the
        caps; the worker hands them out itself, and gives everything back with its last session."""
        worker, _, pump = self.link()
        slots = worker.leases.slots("submission")
        self.assertIsNone(self.acquire(slots, pump, "192.0.2.1"))
        limiter = self.limiters["submission"]
        self.assertEqual(limiter.per_ip["192.0.2.1"], 1 + LEASE)
        local = [slots.acquire("192.0.2.1") for _ in range(LEASE)]  # no pump: no round trip
        self.assertEqual([self.successResultOf(d) for d in local], [None] * LEASE)
        for _ in range(1 + LEASE):
            slots.release("192.0.2.1")
        pump.flush()
        self.assertEqual((limiter.total, dict(limiter.per_ip)), (0, {}))

    def test_aWorkerKeepsAtMostALeaseOfSpares(self) -> None:
        """Sessions that end while others from the address go on leave at most LEASE spares."""
        worker, _, pump = self.link()
        slots = worker.leases.slots("submission")
        for _ in range(3 * LEASE):
            self.assertIsNone(self.acquire(slots, pump, "192.0.2.1"))
        for _ in range(3 * LEASE - 1):
            slots.release("192.0.2.1")
        pump.flush()
        self.assertEqual(self.limiters["submission"].per_ip["192.0.2.1"], 1 + LEASE)

    def test_noSparesNearACap(self) -> None:
        """Once an address or the kind is at half a cap the master lends nothing more."""
        self.limiters["submission"] = ConnectionLimiter(100, 4)
        worker, _, pump = self.link()
        slots = worker.leases.slots("submission")
        self.acquire(slots, pump, "192.0.2.1")
        self.assertEqual(self.limiters["submission"].per_ip["192.0.2.1"], 2)  # one used, one spare
        self.acquire(slots, pump, "192.0.2.1")  # the spare
        self.acquire(slots, pump, "192.0.2.1")
        self.assertEqual(self.limiters["submission"].per_ip["192.0.2.1"], 3)

    def test_aCapTakesBackOtherWorkersSparesBeforeRefusing(self) -> None:
        """A per-address cap refuses only when its slots are in use: the spares another worker
        holds for the address are asked back first, and the cap holds exactly."""
        self.limiters["submission"] = ConnectionLimiter(100, 4)
        s1, p1, s2, p2 = self.two_workers("submission")
        self.assertIsNone(self.acquire(s1, p1, "192.0.2.1"))  # and one spare
        results = []
        for _ in range(4):
            d = s2.acquire("192.0.2.1")
            self.settle()  # the recall crosses the other worker's connection
            results.append(self.successResultOf(d))
        self.assertEqual(results, [None, None, None, PER_IP])
        self.assertEqual(dict(s1.spares), {})
        self.assertEqual(self.limiters["submission"].per_ip["192.0.2.1"], 4)

    def test_withoutALeaseAnEndedSessionsSlotGoesBack(self) -> None:
        """Where nothing was lent (a per-address cap of 2), an ended session's slot goes straight
        back, so another worker's client is not refused while only one slot is in use."""
        s1, p1, s2, p2 = self.two_workers("smtp")
        self.assertIsNone(self.acquire(s1, p1, "192.0.2.1"))
        self.assertIsNone(self.acquire(s1, p1, "192.0.2.1"))
        s1.release("192.0.2.1")
        p1.flush()
        self.assertIsNone(self.acquire(s2, p2, "192.0.2.1"))
        self.assertEqual(self.acquire(s2, p2, "192.0.2.1"), PER_IP)

    def test_askedBackTheLeaseEnds(self) -> None:
        """After giving its spares back, a worker keeps no slot of an ended session as a spare."""
        self.limiters["submission"] = ConnectionLimiter(100, 4)
        s1, p1, s2, p2 = self.two_workers("submission")
        self.acquire(s1, p1, "192.0.2.1")  # and one spare
        self.acquire(s1, p1, "192.0.2.1")  # the spare
        self.acquire(s2, p2, "192.0.2.1")
        self.acquire(s2, p2, "192.0.2.1")
        d = s2.acquire("192.0.2.1")  # refused: the other worker is asked first, and has none
        self.settle()
        self.assertEqual(self.successResultOf(d), PER_IP)
        s1.release("192.0.2.1")
        p1.flush()
        self.assertEqual(dict(s1.spares), {})
        self.assertIsNone(self.acquire(s2, p2, "192.0.2.1"))

    def test_slotsOfSessionsClosedBeforeTheQuestionCount(self) -> None:
        """The worker answers the master's question at the end of its turn: a session whose
        client hung up before the question gives its slot back first, so a client that
        connects right after is not refused for it."""
        s1, p1, s2, p2 = self.two_workers("smtp")
        reactor1 = self.links[0][1]
        self.acquire(s1, p1, "192.0.2.1")
        self.acquire(s1, p1, "192.0.2.1")
        d = s2.acquire("192.0.2.1")  # over the per-address cap of 2
        p2.flush()
        p1.flush()  # the question reaches the first worker ...
        s1.release("192.0.2.1")  # ... in the turn that sees a session closed
        reactor1.advance(0)
        self.settle()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.limiters["smtp"].per_ip["192.0.2.1"], 2)

    def test_refusalsShareOneQuestionPerWorker(self) -> None:
        """Refusals waiting at a full cap ask each worker once, not once each."""
        w1, m1, p1 = self.link(0)
        w2, _, p2 = self.link(1)
        s1, s2 = w1.leases.slots("smtp"), w2.leases.slots("smtp")
        self.acquire(s1, p1, "192.0.2.1")
        self.acquire(s1, p1, "192.0.2.1")
        asked: list[Any] = []
        real = m1.callRemote
        m1.callRemote = lambda command, **kw: asked.append(kw) or real(command, **kw)  # type: ignore[method-assign]
        waiting = [s2.acquire("192.0.2.1") for _ in range(3)]
        self.settle()
        self.assertEqual([self.successResultOf(d) for d in waiting], [PER_IP] * 3)
        self.assertEqual(asked, [{"kind": "smtp", "host": "192.0.2.1"}])

    def test_theTotalCapTakesBackSparesOfEveryAddress(self) -> None:
        """The total cap asks back the spares of every address before refusing."""
        self.limiters["submission"] = ConnectionLimiter(4, 0)
        s1, p1, s2, p2 = self.two_workers("submission")
        self.assertIsNone(self.acquire(s1, p1, "192.0.2.1"))  # and one spare
        results = []
        for host in ("192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"):
            d = s2.acquire(host)
            self.settle()
            results.append(self.successResultOf(d))
        self.assertEqual(results, [None, None, None, TOTAL])
        self.assertEqual(self.limiters["submission"].total, 4)
