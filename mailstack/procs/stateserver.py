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

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailstack.checks import clientrate, inbound
from mailstack.connlimit import ConnectionLimiter, connection_limiters
from mailstack.errors import Reply
from mailstack.inbound.greylist import Greylist
from mailstack.inbound.interfaces import IGreylist
from mailstack.interfaces import ILoginThrottle, ILoginTicket, IRateLimit, IReservation, ISendLimits
from mailstack.procs import statecmds as C
from mailstack.procs.commands import AcquireSlot, ReleaseSlot

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

    def new_id(self) -> int:
        return next(self._ids)

    def worker(self) -> WorkerState:
        """The responders for one more worker connection."""
        return WorkerState(self)


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


class WorkerState(amp.CommandLocator):
    """Answers one worker's state commands and keeps its attempts and holds by id."""

    log = Logger()

    def __init__(self, server: StateServer) -> None:
        super().__init__()
        self.server = server
        self.tickets: dict[int, ILoginTicket] = {}
        self.reservations: dict[int, IReservation] = {}
        self.slots: Counter[tuple[str, str]] = Counter()  # (kind, host) -> connection slots held
        self.gone = False

    # -- connection slots -----------------------------------------------------------

    @AcquireSlot.responder
    def acquire_slot(self, kind: str, host: str) -> dict[str, str]:
        over = self.server.limiters[kind].take(host)
        if over is None:
            if self.gone:  # granted after the worker left: give it back at once
                self.server.limiters[kind].release(host)
            else:
                self.slots[kind, host] += 1
        return {"over": over or ""}

    @ReleaseSlot.responder
    def release_slot(self, kind: str, host: str) -> dict[str, str]:
        if self.slots[kind, host] > 0:  # not ours (a confused worker): keep the counts right
            self.slots[kind, host] -= 1
            self.server.limiters[kind].release(host)
        if not self.slots[kind, host]:
            del self.slots[kind, host]
        return {}

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
        slots, self.slots = self.slots, Counter()
        for (kind, host), n in slots.items():
            for _ in range(n):
                self.server.limiters[kind].release(host)
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
