# -*- test-case-name: tests.procs.test_slots -*-
"""Connection caps across session processes, kept by the master and asked over AMP;
and the worker's queue kicks.

Each kind of listener has one ``connlimit.ConnectionLimiter`` in the master
(smtp; submission and submissions; pop3 and pop3s), so ``smtp.max_connections``
and the per-address caps hold over all workers together.  The master keeps
which slots each worker holds with its other holds (``stateserver.WorkerState``):
a worker that dies gives all of them back.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.interfaces import IConnectionSlots, IQueueKicker
from mailstack.procs.commands import AcquireSlot, Kick, ReleaseSlot


@implementer(IConnectionSlots)
class RemoteSlots:
    """A worker's slots of one kind, asked from the master over ``channel`` (an ``amp.AMP``)."""

    log = Logger()

    def __init__(self, channel: Any, kind: str) -> None:
        self.channel = channel
        self.kind = kind

    def acquire(self, host: str) -> Deferred[str | None]:
        d = self.channel.callRemote(AcquireSlot, kind=self.kind, host=host)
        return d.addCallback(lambda answer: answer["over"] or None)

    def release(self, host: str) -> None:
        try:
            self.channel.callRemote(ReleaseSlot, kind=self.kind, host=host)
        except Exception:  # the master is gone; its successor starts with no slots taken
            self.log.failure("cannot give back a {kind} slot", kind=self.kind)


@implementer(IQueueKicker)
class RemoteKicker:
    """A worker's ``IQueueKicker``: tells the master's queue manager (no answer awaited)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def kick(self, queue_id: str) -> None:
        self.channel.callRemote(Kick, queue_id=queue_id)
