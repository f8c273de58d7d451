# -*- test-case-name: tests.procs.test_state -*-
"""The AMP commands a worker process sends the master for the state all workers share.

With several worker processes, each limit on clients must count across all of
them, so the master keeps the one login throttle, the sending limits, the
per-client message counts of the MX listener and the greylisting table
(``procs.stateserver``), and the workers ask for them over their AMP
connection (``procs.stateclient``).  Arguments and answers are plain strings,
integers, floats and booleans; a login attempt or a message hold lives in the
master under an integer id it allocates (never 0, which means "refused").

Ending an attempt or a hold needs no answer (``requiresAnswer = False``), and
ending one that is already over (or unknown) is a no-op in the master, like
the second verdict on a local ticket.  A connection drop ends every attempt
and hold of that worker: attempts are abandoned, holds released.
"""

from __future__ import annotations

from twisted.protocols import amp


class NotShared(Exception):
    """The master keeps no such state (the check is off in its configuration)."""


class StateFailed(Exception):
    """The master's state object failed on this request (logged in the master)."""


#: The errors every state command may answer with, by their AMP error code.
ERRORS: dict[type[Exception], bytes] = {NotShared: b"NOT_SHARED", StateFailed: b"STATE_FAILED"}

#: The id answered for a refused attempt or hold.
REFUSED = 0


class ThrottleBegin(amp.Command):
    """``ILoginThrottle.begin``: ``ticket`` REFUSED (refused now) or the attempt's id."""

    arguments = [(b"peer", amp.Unicode()), (b"account", amp.Unicode())]
    response = [(b"ticket", amp.Integer()), (b"delay", amp.Float())]
    errors = ERRORS


class TicketSucceeded(amp.Command):
    """``ILoginTicket.succeeded`` of attempt ``ticket``."""

    arguments = [(b"ticket", amp.Integer())]
    requiresAnswer = False


class TicketFailed(amp.Command):
    """``ILoginTicket.failed`` of attempt ``ticket``: the reply's delay (0.0 if it was over)."""

    arguments = [(b"ticket", amp.Integer())]
    response = [(b"delay", amp.Float())]
    errors = ERRORS


class TicketAbandoned(amp.Command):
    """``ILoginTicket.abandoned`` of attempt ``ticket``."""

    arguments = [(b"ticket", amp.Integer())]
    requiresAnswer = False


class SendReserve(amp.Command):
    """``ISendLimits.reserve``: ``reservation`` the hold's id, or REFUSED with the
    reply's ``code``, ``enhanced`` and ``text``."""

    arguments = [(b"user", amp.Unicode())]
    response = [
        (b"reservation", amp.Integer()),
        (b"code", amp.Integer(optional=True)),
        (b"enhanced", amp.Unicode(optional=True)),
        (b"text", amp.Unicode(optional=True)),
    ]
    errors = ERRORS


class ReservationCommit(amp.Command):
    """``IReservation.commit`` of hold ``reservation``."""

    arguments = [(b"reservation", amp.Integer())]
    requiresAnswer = False


class ReservationRelease(amp.Command):
    """``IReservation.release`` of hold ``reservation``."""

    arguments = [(b"reservation", amp.Integer())]
    requiresAnswer = False


class RateAdmit(amp.Command):
    """``IRateLimit.admit`` of the per-client message counts; NotShared when they are off."""

    arguments = [(b"key", amp.Unicode())]
    response = [(b"allowed", amp.Boolean())]
    errors = ERRORS


class CheckGreylist(amp.Command):
    """``IGreylist.check`` of a triplet; NotShared when greylisting is off."""

    arguments = [(b"ip", amp.Unicode()), (b"sender", amp.Unicode()), (b"recipient", amp.Unicode())]
    response = [(b"passed", amp.Boolean())]
    errors = ERRORS
