"""Tests for mailstack.procs.slots, the slots kept by procs.stateserver, and the master's
end of a worker's AMP connection."""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack.connlimit import PER_IP, TOTAL, ConnectionLimiter
from mailstack.interfaces import IConnectionSlots, IQueueKicker
from mailstack.procs.commands import Ready
from mailstack.procs.master import MasterChannel
from mailstack.procs.slots import RemoteKicker, RemoteSlots
from mailstack.procs.stateserver import StateServer
from tests.support.fakes import FakeThrottle


@implementer(IQueueKicker)
class RecordingKicker:
    def __init__(self) -> None:
        self.kicked: list[str] = []

    def kick(self, queue_id: str) -> None:
        self.kicked.append(queue_id)


class MasterWorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.limiters = {"smtp": ConnectionLimiter(3, 2), "submission": ConnectionLimiter(0, 0)}
        self.kicker = RecordingKicker()
        verifyObject(IQueueKicker, self.kicker)
        self.ready: list[int] = []
        self.state = StateServer(FakeThrottle(), None, limiters=self.limiters)  # type: ignore[arg-type]

    def link(self, index: int = 0) -> tuple[amp.AMP, MasterChannel, Any]:
        """A worker's AMP connection to its master channel, pumped in memory."""
        channel = MasterChannel(index, self.kicker, self.ready.append, self.state.worker())
        worker, master, pump = connectedServerAndClient(lambda: channel, amp.AMP)
        return worker, master, pump

    def acquire(self, slots: RemoteSlots, pump: Any, host: str) -> str | None:
        d = slots.acquire(host)
        pump.flush()
        return self.successResultOf(d)

    def test_capsHoldAcrossWorkers(self) -> None:
        """Slots taken through two workers count against one cap; a released one is free again."""
        w1, _, p1 = self.link(0)
        w2, _, p2 = self.link(1)
        s1, s2 = RemoteSlots(w1, "smtp"), RemoteSlots(w2, "smtp")
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
            self.acquire(RemoteSlots(w1, "smtp"), p1, "192.0.2.1")
        self.acquire(RemoteSlots(w2, "smtp"), p2, "192.0.2.2")
        self.assertEqual(self.limiters["smtp"].total, 3)
        w1.transport.loseConnection()
        p1.flush()
        self.assertEqual((self.limiters["smtp"].total, dict(self.limiters["smtp"].per_ip)), (1, {"192.0.2.2": 1}))

    def test_slotGrantedAfterTheWorkerLeftGoesBack(self) -> None:
        """A slot granted to a worker whose connection is already gone is given back at once."""
        held = self.state.worker()
        held.lost()
        self.assertEqual(held.acquire_slot("smtp", "192.0.2.1"), {"over": ""})
        self.assertEqual(self.limiters["smtp"].total, 0)

    def test_releaseOfASlotNotHeldIsIgnored(self) -> None:
        """A release the worker does not hold cannot push the master's counts below the truth."""
        w1, _, p1 = self.link(0)
        w2, _, p2 = self.link(1)
        self.acquire(RemoteSlots(w1, "smtp"), p1, "192.0.2.1")
        RemoteSlots(w2, "smtp").release("192.0.2.1")
        p2.flush()
        self.assertEqual(self.limiters["smtp"].total, 1)

    def test_kickReachesTheQueueManager(self) -> None:
        """A worker's kick is the master's queue manager's kick."""
        worker, _, pump = self.link()
        kicker = RemoteKicker(worker)
        verifyObject(IQueueKicker, kicker)
        kicker.kick("q1")
        pump.flush()
        self.assertEqual(self.kicker.kicked, ["q1"])

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
        slots = RemoteSlots(worker, "smtp")
        worker.transport.loseConnection()
        pump.flush()
        slots.release("192.0.2.1")  # must not raise
        self.flushLoggedErrors()
