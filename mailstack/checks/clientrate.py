# -*- test-case-name: tests.test_checks_inbound -*-
"""Messages per client IP and minute on the MX listener (``inbound.max_messages_per_minute``).

Each MAIL of an unauthenticated client counts; over the limit within the last
60 seconds, MAIL gets 451 4.7.1 (RFC 3463: delivery not authorized, try
later), so a well-behaved sender queues and retries and a flood slows down.
The counts live in memory (``ratelimit.RateLimiter``).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from mailstack.checks.refusals import RATE_EXCEEDED, refuse
from mailstack.errors import Reply
from mailstack.pipeline import Check, Connection, Transaction
from mailstack.ratelimit import RateLimiter


class ClientRateCheck(Check):
    """At most ``limit`` transactions per client IP and minute."""

    name = "rate"
    submission = False

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        self.limiter = RateLimiter(clock, limit, window=60.0)

    def mail(self, conn: Connection, txn: Transaction) -> Reply | None:
        if not self.limiter.allowed(conn.peer):
            return refuse(conn, self.name, f"more than {self.limiter.limit} messages per minute", RATE_EXCEEDED)
        self.limiter.record(conn.peer)
        return None
