# -*- test-case-name: tests.procs.test_slots -*-
"""Connection caps across session processes, kept by the master and lent to the
workers in small batches; and the worker's queue kicks, sent once per turn.

Each kind of listener has one ``connlimit.ConnectionLimiter`` in the master
(smtp; submission and submissions; pop3 and pop3s), so ``smtp.max_connections``
and the per-address caps hold over all workers together.  Asking the master
for each connection cost two AMP messages per session, most of the master's
CPU under load; so the master lends slots (``stateserver.WorkerState``).

* When a worker asks for a slot for an address, the master takes it and, while
  the address and the kind are below half their caps, up to ``LEASE`` more
  (``spares``) for the same address, counted against the caps like used ones.
* The worker (``LeasedSlots``) hands its spares of that address to the next
  sessions without asking, and keeps at most ``LEASE`` of them once a session
  ends (only while the lease lasts: else each slot goes straight back); when
  its last session from the address ends it gives all of them back
  (``ReleaseSlot``), so idle addresses hold nothing.
* When a cap would refuse a connection, the master first asks the workers
  that hold slots counting against it to give their spares back
  (``ReturnSpares``, which also ends their leases; answered at the end of the
  worker's turn, after the sessions it saw closed gave theirs back) and tries
  again: a client is refused only when the slots are in use.  The caps stay
  exact; only the refusals cost round trips (one question per worker and cap
  at a time, shared by the refusals waiting on it).

The master keeps which slots each worker holds, used or spare, with its other
holds: a worker that dies gives all of them back.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from mailstack.interfaces import IConnectionSlots, IQueueKicker
from mailstack.procs.commands import AcquireSlot, Kick, ReleaseSlot, ReturnSpares

#: The most spare slots of one address a worker is lent at once, or keeps.
LEASE = 8

#: Queue ids per ``Kick`` (an AMP value holds at most 64 KiB).
KICKS_PER_MESSAGE = 500


@implementer(IConnectionSlots)
class LeasedSlots:
    """A worker's slots of one kind: its spares first, else asked from the master over ``channel``."""

    log = Logger()

    def __init__(self, channel: amp.AMP, kind: str) -> None:
        self.channel = channel
        self.kind = kind
        self.in_use: Counter[str] = Counter()
        self.spares: Counter[str] = Counter()
        # Addresses the master lent spares for since it last asked them back: only for
        # these does an ended session's slot stay here as a spare (the master then
        # knows to ask us before a cap refuses anyone).
        self.leased: set[str] = set()

    def acquire(self, host: str) -> Deferred[str | None]:
        if self.spares[host] > 0:
            self._move(self.spares, self.in_use, host, 1)
            return succeed(None)

        def granted(answer: dict[str, Any]) -> str | None:
            if answer["over"]:
                return str(answer["over"])
            self.in_use[host] += 1
            if answer["spares"]:
                self.spares[host] += answer["spares"]
                self.leased.add(host)
            return None

        d: Deferred[dict[str, Any]] = self.channel.callRemote(AcquireSlot, kind=self.kind, host=host)
        return d.addCallback(granted)

    def release(self, host: str) -> None:
        if self.in_use[host] <= 0:
            return
        self._move(self.in_use, self.spares, host, 1)
        if not self.in_use[host]:
            self.leased.discard(host)
        keep = LEASE if host in self.leased else 0
        surplus = self.spares[host] - keep
        if surplus > 0:
            self._move(self.spares, None, host, surplus)
            try:
                self.channel.callRemote(ReleaseSlot, kind=self.kind, host=host, count=surplus)
            except Exception:  # the master is gone; its successor starts with no slots taken
                self.log.failure("cannot give back {kind} slots", kind=self.kind)

    def give_back(self, host: str) -> list[dict[str, Any]]:
        """Drop the spares of ``host`` ("": of every host): the answer to ``ReturnSpares``."""
        hosts = [host] if host else list(self.spares)
        self.leased.difference_update([host] if host else list(self.leased))
        returned = [{"host": h, "count": self.spares[h]} for h in hosts if self.spares[h] > 0]
        for entry in returned:
            del self.spares[entry["host"]]
        return returned

    @staticmethod
    def _move(source: Counter[str], target: Counter[str] | None, host: str, n: int) -> None:
        source[host] -= n
        if source[host] <= 0:
            del source[host]
        if target is not None:
            target[host] += n


class SlotLeases(amp.CommandLocator):
    """A worker's ``LeasedSlots`` of every kind, and its answer to the master's ``ReturnSpares``."""

    def __init__(self, channel: amp.AMP, reactor: IReactorTime) -> None:
        super().__init__()
        self.channel = channel
        self.reactor = reactor
        self.kinds: dict[str, LeasedSlots] = {}

    def slots(self, kind: str) -> LeasedSlots:
        """The ``IConnectionSlots`` of ``kind`` (one per kind)."""
        if kind not in self.kinds:
            self.kinds[kind] = LeasedSlots(self.channel, kind)
        return self.kinds[kind]

    @ReturnSpares.responder
    def return_spares(self, kind: str, host: str) -> Deferred[dict[str, Any]]:
        """Answered at the end of this reactor turn: the sessions whose clients hung up
        before the master asked (seen closed in this turn) give their slots back first,
        and those messages reach the master before the answer."""

        def answer() -> dict[str, Any]:
            slots = self.kinds.get(kind)
            return {"returned": slots.give_back(host) if slots is not None else []}

        return deferLater(self.reactor, 0, answer)


@implementer(IQueueKicker)
class RemoteKicker:
    """A worker's ``IQueueKicker``: tells the master's queue manager (no answer awaited).

    The kicks of one reactor turn (the commits whose thread calls ended in
    it) go in one ``Kick``, at the end of the turn: one AMP message per turn
    instead of per message.  A kick lost with a crash costs only time (the next start scans
    the queue).
    """

    log = Logger()

    def __init__(self, channel: amp.AMP, reactor: IReactorTime) -> None:
        self.channel = channel
        self.reactor = reactor
        self._ids: list[str] = []

    def kick(self, queue_id: str) -> None:
        self._ids.append(queue_id)
        if len(self._ids) == 1:
            self.reactor.callLater(0, self._send)

    def _send(self) -> None:
        ids, self._ids = self._ids, []
        for start in range(0, len(ids), KICKS_PER_MESSAGE):
            try:
                self.channel.callRemote(Kick, queue_ids=ids[start : start + KICKS_PER_MESSAGE])
            except Exception:  # the master is gone; its successor scans the queue
                self.log.failure("cannot kick the queue manager")
                return
