# -*- test-case-name: tests.test_checks_inbound -*-
"""Messages per client IP and minute on the MX listener (``inbound.max_messages_per_minute``).

Each MAIL of an unauthenticated client counts; over the limit within the last
60 seconds, MAIL gets 451 4.7.1 (RFC 3463: delivery not authorized, try
later), so a well-behaved sender queues and retries and a flood slows down.
The counts live in memory (``ratelimit.RateLimiter``, from ``limiter``): in
this process, or with several worker processes in the master, which the
workers ask over AMP (``procs.stateclient``).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mailstack.checks.refusals import RATE_EXCEEDED, refuse
from mailstack.errors import Reply
from mailstack.interfaces import IRateLimit
from mailstack.pipeline import Check, Connection, Transaction
from mailstack.ratelimit import RateLimiter

WINDOW = 60.0


def limiter(clock: IReactorTime, limit: int) -> RateLimiter:
    """The in-memory counts behind the check: ``limit`` messages per client and minute."""
    return RateLimiter(clock, limit, window=WINDOW)


class ClientRateCheck(Check):
    """At most ``limit`` transactions per client IP and minute, counted by ``counts``."""

    name = "rate"
    submission = False

    def __init__(self, counts: IRateLimit, limit: int) -> None:
        self.counts = counts
        self.limit = limit

    def mail(self, conn: Connection, txn: Transaction) -> Deferred[Reply | None]:
        def answer(allowed: bool) -> Reply | None:
            if allowed:
                return None
            return refuse(conn, self.name, f"more than {self.limit} messages per minute", RATE_EXCEEDED)

        d: Deferred[Reply | None] = self.counts.admit(conn.peer).addCallback(answer)
        return d
