# -*- test-case-name: tests.procs.test_state -*-
"""The master's side of the shared state: the one throttle, sending limits,
client counts and greylist, answering every worker's ``procs.statecmds``.

``StateServer`` holds the real objects and allocates the ids of login attempts
and message holds; each worker connection gets its own ``WorkerState`` (an AMP
``CommandLocator``), which knows the attempts and holds of that worker only, so
one worker cannot end another's, and abandons and releases all of them when
its connection is lost (a crashed worker must not keep a user's messages held
or an address's attempts pending).  The master's end of a worker connection
(``procs.master.MasterChannel``) asks its ``WorkerState`` for the responders it
lacks itself, and calls ``lost()`` from its ``connectionLost``.

The objects answer through Deferreds (here they fire at once), which AMP
sends back when they fire.  An unexpected error is logged here and answered
``StateFailed``: AMP would otherwise drop the whole worker connection.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailstack.checks import clientrate, inbound
from mailstack.connlimit import PER_IP, ConnectionLimiter, connection_limiters
from mailstack.errors import Reply
from mailstack.inbound.greylist import Greylist
from mailstack.inbound.interfaces import IGreylist
from mailstack.interfaces import ILoginThrottle, ILoginTicket, IRateLimit, IReservation, ISendLimits
from mailstack.procs import statecmds as C
from mailstack.procs.commands import AcquireSlot, ReleaseSlot, ReturnSpares
from mailstack.procs.slots import LEASE

T = TypeVar("T")


class StateServer:
    """The state all workers share; ``rate`` and ``greylist`` None when their check is off."""

    def __init__(
        self,
        throttle: ILoginThrottle,
        send_limits: ISendLimits,
        rate: IRateLimit | None = None,
        greylist: IGreylist | None = None,
        limiters: Mapping[str, ConnectionLimiter] | None = None,
    ) -> None:
        self.throttle = throttle
        self.send_limits = send_limits
        self.rate = rate
        self.greylist = greylist
        self.limiters = limiters or {}  # listener kind -> the connection caps of all workers
        self._ids = itertools.count(C.REFUSED + 1)
        self.workers: set[WorkerState] = set()
        self.recalling: list[Deferred[None]] = []  # ReturnSpares asked and not answered yet

    def new_id(self) -> int:
        return next(self._ids)

    def worker(self) -> WorkerState:
        """The responders for one more worker connection."""
        state = WorkerState(self)
        self.workers.add(state)
        return state

    def holders(self, kind: str, host: str) -> list[WorkerState]:
        """The workers that hold slots of ``kind`` for ``host`` ("": any host)."""
        return [w for w in self.workers if any(k == kind and (not host or h == host) for k, h in w.slots)]


def build(runtime: Any) -> tuple[StateServer, Greylist | None]:
    """The master's ``StateServer`` over ``runtime.throttle`` and ``runtime.send_limits``,
    with the client counts and greylist table ``[inbound]`` asks for; also the
    greylist table (an ``IService`` to start and stop with the master) or None."""
    cfg = runtime.config.inbound
    limit = cfg.max_messages_per_minute
    rate = clientrate.limiter(runtime.reactor, limit) if limit else None
    table = inbound.greylist_table(runtime) if cfg.greylist is not None else None
    limiters = connection_limiters(runtime.config)
    return StateServer(runtime.throttle, runtime.send_limits, rate, table, limiters), table


def lendable(limiter: ConnectionLimiter, host: str) -> bool:
    """Whether one more spare slot of ``host`` keeps ``limiter`` below half of each cap:
    near a cap the master lends nothing, so that its slots go where clients are."""
    return (not limiter.max_total or 2 * (limiter.total + 1) <= limiter.max_total) and (
        not limiter.max_per_ip or 2 * (limiter.per_ip[host] + 1) <= limiter.max_per_ip
    )


class WorkerState(amp.CommandLocator):
    """Answers one worker's state commands and keeps its attempts and holds by id."""

    log = Logger()

    def __init__(self, server: StateServer) -> None:
        super().__init__()
        self.server = server
        self.tickets: dict[int, ILoginTicket] = {}
        self.reservations: dict[int, IReservation] = {}
        self.slots: Counter[tuple[str, str]] = Counter()  # (kind, host) -> connection slots held
        self._recalls: dict[tuple[str, str], Deferred[None]] = {}  # ReturnSpares on its way, by (kind, host)
        self.channel: amp.AMP | None = None  # the master's end of the worker's connection, for recalls
        self.gone = False

    # -- connection slots (lent in batches: procs.slots) --------------------------

    @AcquireSlot.responder
    def acquire_slot(self, kind: str, host: str) -> Deferred[dict[str, Any]]:
        limiter = self.server.limiters[kind]
        over = limiter.take(host)
        if over is None:
            return succeed(self._grant(kind, host))
        scope = host if over == PER_IP else ""
        for holder in self.server.holders(kind, scope):
            holder.recall(kind, scope)
        # Wait for every answer on its way, ours and those asked for another refusal.
        asked = list(self.server.recalling)

        def again(_: object) -> dict[str, Any]:
            over = limiter.take(host)
            return self._grant(kind, host) if over is None else {"over": over, "spares": 0}

        return DeferredList(asked).addCallback(again)

    def _grant(self, kind: str, host: str) -> dict[str, Any]:
        """One slot of ``host`` taken: add the spares lent with it; give all back if we are gone."""
        limiter = self.server.limiters[kind]
        if self.gone:  # lost while the answer waited for a recall
            limiter.release(host)
            return {"over": "", "spares": 0}
        spares = 0
        while spares < LEASE and lendable(limiter, host) and limiter.take(host) is None:
            spares += 1
        self.slots[kind, host] += 1 + spares
        return {"over": "", "spares": spares}

    @ReleaseSlot.responder
    def release_slot(self, kind: str, host: str, count: int) -> dict[str, str]:
        self._give_back(kind, host, count)
        return {}

    def _give_back(self, kind: str, host: str, count: int) -> None:
        """Release up to ``count`` slots of ``host`` this worker holds (never another's)."""
        count = min(count, self.slots[kind, host])
        for _ in range(count):
            self.server.limiters[kind].release(host)
        self.slots[kind, host] -= count
        if self.slots[kind, host] <= 0:
            del self.slots[kind, host]

    def recall(self, kind: str, host: str) -> Deferred[None]:
        """Ask the worker for its spares of ``kind`` for ``host`` ("": every host) and release
        them; one question at a time per (kind, host), shared by the refusals waiting on it.

        The worker answers at the end of its reactor turn, after the sessions that the
        same turn saw closed have given their slots back (``slots.SlotLeases``); so a
        client is not refused for slots whose clients are already gone either.
        """
        key = (kind, host)
        if key in self._recalls or self.channel is None:
            return self._recalls.get(key) or succeed(None)

        def returned(answer: dict[str, Any]) -> None:
            for entry in answer["returned"]:
                self._give_back(kind, entry["host"], entry["count"])

        def done(result: None) -> None:
            del self._recalls[key]
            self.server.recalling.remove(d)

        d: Deferred[Any] = self.channel.callRemote(ReturnSpares, kind=kind, host=host)
        d.addCallbacks(returned, lambda failure: None)  # gone: lost() releases everything
        self._recalls[key] = d
        self.server.recalling.append(d)
        return d.addCallback(done)

    # -- login throttle -----------------------------------------------------------

    @C.ThrottleBegin.responder
    def begin(self, peer: str, account: str) -> Deferred[dict[str, Any]]:
        def answer(ticket: ILoginTicket | None) -> dict[str, Any]:
            if ticket is None:
                return {"ticket": C.REFUSED, "delay": 0.0}
            return {"ticket": self._keep(self.tickets, ticket, ticket.abandoned), "delay": float(ticket.delay)}

        return self._ask(self.server.throttle.begin, peer, account).addCallback(answer)

    @C.TicketSucceeded.responder
    def succeeded(self, ticket: int) -> dict[str, Any]:
        held = self.tickets.pop(ticket, None)
        if held is not None:
            held.succeeded()
        return {}

    @C.TicketFailed.responder
    def failed(self, ticket: int) -> Deferred[dict[str, Any]]:
        held = self.tickets.pop(ticket, None)
        if held is None:  # over already: like a local ticket's second verdict
            return succeed({"delay": 0.0})
        return self._ask(held.failed).addCallback(lambda delay: {"delay": float(delay)})

    @C.TicketAbandoned.responder
    def abandoned(self, ticket: int) -> dict[str, Any]:
        held = self.tickets.pop(ticket, None)
        if held is not None:
            held.abandoned()
        return {}

    # -- sending limits -------------------------------------------------------------

    @C.SendReserve.responder
    def reserve(self, user: str) -> Deferred[dict[str, Any]]:
        def answer(result: Reply | IReservation) -> dict[str, Any]:
            if isinstance(result, Reply):
                return {"reservation": C.REFUSED, "code": result.code, "enhanced": result.enhanced, "text": result.text}
            return {"reservation": self._keep(self.reservations, result, result.release)}

        return self._ask(self.server.send_limits.reserve, user).addCallback(answer)

    @C.ReservationCommit.responder
    def commit(self, reservation: int) -> dict[str, Any]:
        held = self.reservations.pop(reservation, None)
        if held is not None:
            held.commit()
        return {}

    @C.ReservationRelease.responder
    def release(self, reservation: int) -> dict[str, Any]:
        held = self.reservations.pop(reservation, None)
        if held is not None:
            held.release()
        return {}

    # -- inbound checks -------------------------------------------------------------

    @C.RateAdmit.responder
    def admit(self, key: str) -> Deferred[dict[str, Any]]:
        rate = self.server.rate
        if rate is None:
            raise C.NotShared("no per-client message counts in the master")
        return self._ask(rate.admit, key).addCallback(lambda allowed: {"allowed": bool(allowed)})

    @C.CheckGreylist.responder
    def greylisted(self, ip: str, sender: str, recipient: str) -> Deferred[dict[str, Any]]:
        greylist = self.server.greylist
        if greylist is None:
            raise C.NotShared("no greylist in the master")
        return self._ask(greylist.check, ip, sender, recipient).addCallback(lambda passed: {"passed": bool(passed)})

    # -- bookkeeping ----------------------------------------------------------------

    def _ask(self, f: Callable[..., Deferred[T]], *args: Any) -> Deferred[T]:
        """``f(*args)``; an unexpected error is logged and answered StateFailed."""

        def failed(failure: Failure) -> Failure:
            if failure.check(C.NotShared, C.StateFailed):
                return failure
            self.log.failure("shared state: a worker's request failed", failure)
            return Failure(C.StateFailed("the master's state failed; see its log"))

        d: Deferred[T] = maybeDeferred(f, *args).addErrback(failed)
        return d

    def _keep(self, table: dict[int, Any], held: Any, end: Callable[[], None]) -> int:
        """Keep ``held`` under a new id; ended at once if the worker is gone already."""
        if self.gone:
            end()
            return C.REFUSED
        ident = self.server.new_id()
        table[ident] = held
        return ident

    def lost(self) -> None:
        """The worker's connection is gone: abandon its attempts, release its holds and slots."""
        self.gone = True
        self.server.workers.discard(self)
        for (kind, host), n in list(self.slots.items()):
            self._give_back(kind, host, n)
        tickets, self.tickets = self.tickets, {}
        reservations, self.reservations = self.reservations, {}
        for ticket in tickets.values():
            ticket.abandoned()
        for reservation in reservations.values():
            reservation.release()
        if tickets or reservations:
            self.log.info(
                "worker connection lost: {tickets} login attempts abandoned, {holds} message holds released",
                tickets=len(tickets),
                holds=len(reservations),
            )
