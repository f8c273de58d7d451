# -*- test-case-name: tests.procs.test_state -*-
"""A worker's side of the shared state: proxies that ask the master over AMP.

Each proxy provides the interface of the object it stands for (the login
throttle, the sending limits, the per-client message counts, the greylist),
so the sessions and checks run the same code in one process and in a worker.
``remote_state(proto)`` builds all four over the worker's ``amp.AMP``
connection to the master (``procs.statecmds``, answered by
``procs.stateserver``).

A login attempt or a message hold is ended once: the proxy forgets its id at
the first verdict, as the local objects do.  If the master cannot be reached
the Deferreds fail, and the session answers as for any failed check (a
temporary 4xx: the client retries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.protocols import amp
from zope.interface import implementer

from mailstack.errors import Reply
from mailstack.inbound.interfaces import IGreylist
from mailstack.interfaces import ILoginThrottle, ILoginTicket, IRateLimit, IReservation, ISendLimits
from mailstack.procs import statecmds as C


def _ask(proto: amp.AMP, command: type[amp.Command], **arguments: Any) -> Deferred[dict[str, Any]]:
    """The master's answer to ``command``; an argument AMP cannot carry (a value
    over 64 KiB) fails the Deferred like any other error instead of raising."""
    d: Deferred[dict[str, Any]] = maybeDeferred(proto.callRemote, command, **arguments)
    return d


class _Held:
    """An attempt or hold in the master; the first call that ends it takes its id."""

    def __init__(self, proto: amp.AMP, ident: int) -> None:
        self._proto = proto
        self._id: int | None = ident

    def _take(self) -> int | None:
        """The id, the first time only (None once ended)."""
        ident, self._id = self._id, None
        return ident


@implementer(ILoginTicket)
class RemoteTicket(_Held):
    """One login attempt reserved with the master's throttle."""

    def __init__(self, proto: amp.AMP, ident: int, delay: float) -> None:
        super().__init__(proto, ident)
        self.delay = delay

    def succeeded(self) -> None:
        ident = self._take()
        if ident is not None:
            self._proto.callRemote(C.TicketSucceeded, ticket=ident)

    def failed(self) -> Deferred[float]:
        ident = self._take()
        if ident is None:
            return succeed(0.0)
        answer = _ask(self._proto, C.TicketFailed, ticket=ident)
        return answer.addCallback(lambda r: float(r["delay"]))

    def abandoned(self) -> None:
        ident = self._take()
        if ident is not None:
            self._proto.callRemote(C.TicketAbandoned, ticket=ident)


@implementer(ILoginThrottle)
class RemoteThrottle:
    """The master's login throttle."""

    def __init__(self, proto: amp.AMP) -> None:
        self._proto = proto

    def begin(self, peer: str, account: str) -> Deferred[ILoginTicket | None]:
        def ticket(answer: dict[str, Any]) -> ILoginTicket | None:
            if answer["ticket"] == C.REFUSED:
                return None
            return RemoteTicket(self._proto, answer["ticket"], answer["delay"])

        answer = _ask(self._proto, C.ThrottleBegin, peer=peer, account=account)
        return answer.addCallback(ticket)


@implementer(IReservation)
class RemoteReservation(_Held):
    """One message of ``user`` held against the master's sending limits."""

    def __init__(self, proto: amp.AMP, ident: int, user: str) -> None:
        super().__init__(proto, ident)
        self.user = user

    def commit(self) -> None:
        ident = self._take()
        if ident is not None:
            self._proto.callRemote(C.ReservationCommit, reservation=ident)

    def release(self) -> None:
        ident = self._take()
        if ident is not None:
            self._proto.callRemote(C.ReservationRelease, reservation=ident)


@implementer(ISendLimits)
class RemoteSendLimits:
    """The master's per-user sending limits."""

    def __init__(self, proto: amp.AMP) -> None:
        self._proto = proto

    def reserve(self, user: str) -> Deferred[Reply | IReservation]:
        def held(answer: dict[str, Any]) -> Reply | IReservation:
            if answer["reservation"] == C.REFUSED:
                return Reply(answer["code"], answer["enhanced"], answer["text"])
            return RemoteReservation(self._proto, answer["reservation"], user)

        answer = _ask(self._proto, C.SendReserve, user=user)
        return answer.addCallback(held)


@implementer(IRateLimit)
class RemoteRateLimit:
    """The master's per-client message counts of the MX listener."""

    def __init__(self, proto: amp.AMP) -> None:
        self._proto = proto

    def admit(self, key: str) -> Deferred[bool]:
        answer = _ask(self._proto, C.RateAdmit, key=key)
        return answer.addCallback(lambda r: bool(r["allowed"]))


@implementer(IGreylist)
class RemoteGreylist:
    """The master's greylisting table."""

    def __init__(self, proto: amp.AMP) -> None:
        self._proto = proto

    def check(self, ip: str, sender: str, recipient: str) -> Deferred[bool]:
        answer = _ask(self._proto, C.CheckGreylist, ip=ip, sender=sender, recipient=recipient)
        return answer.addCallback(lambda r: bool(r["passed"]))


@dataclass(frozen=True)
class RemoteState:
    """The four proxies of one worker (``rate``/``greylist`` used only when their check is on)."""

    throttle: RemoteThrottle
    send_limits: RemoteSendLimits
    rate: RemoteRateLimit
    greylist: RemoteGreylist


def remote_state(proto: amp.AMP) -> RemoteState:
    """Proxies for the master's shared state over a worker's AMP connection ``proto``."""
    return RemoteState(RemoteThrottle(proto), RemoteSendLimits(proto), RemoteRateLimit(proto), RemoteGreylist(proto))
