# -*- test-case-name: tests.test_connlimit -*-
"""Connection caps over every listener of one protocol.

The runtime builds one ``ConnectionLimiter`` per kind of listener:
``smtp.max_connections`` and ``smtp.max_connections_per_ip`` for the MX
(smtp) listeners, ``submission.max_connections`` and
``submission.max_connections_per_ip`` for submission and submissions
together, ``pop3.max_connections`` and ``pop3.max_connections_per_ip`` for
pop3 and pop3s together.  Within a kind a client cannot double its share by
using a second port; across kinds an unauthenticated flood of the MX port
cannot take the slots that users need to submit mail (Postfix likewise gives
each ``master.cf`` service its own process limit).  A session takes a slot
when it starts (``CommandSession.connectionMade``) and gives it back when the
connection is gone.

Sessions ask through ``IConnectionSlots``, whose answer is a Deferred: with
several session processes the caps are kept by the master process and asked
over AMP (``procs.slots``); here the answer is immediate (``take``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailstack.interfaces import IConnectionSlots

# Why acquire() refused.
TOTAL = "total"
PER_IP = "per-ip"


@implementer(IConnectionSlots)
class ConnectionLimiter:
    """At most ``max_total`` sessions, and ``max_per_ip`` from one address; 0 means no cap."""

    def __init__(self, max_total: int, max_per_ip: int = 0) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def acquire(self, host: str) -> Deferred[str | None]:
        """``IConnectionSlots.acquire``: ``take(host)``, answered at once."""
        return succeed(self.take(host))

    def take(self, host: str) -> str | None:
        """Take a slot for a session from ``host``: None, or ``TOTAL``/``PER_IP`` if a cap is reached."""
        if self.max_total and self.total >= self.max_total:
            return TOTAL
        if self.max_per_ip and self.per_ip[host] >= self.max_per_ip:
            return PER_IP
        self.total += 1
        self.per_ip[host] += 1
        return None

    def release(self, host: str) -> None:
        """Give back the slot a successful ``acquire(host)`` took."""
        self.total -= 1
        self.per_ip[host] -= 1
        if self.per_ip[host] <= 0:
            del self.per_ip[host]


def connection_limiters(config: Any) -> dict[str, ConnectionLimiter]:
    """One limiter per kind of listener (smtp, submission, pop3), with the caps of ``config``."""
    smtp, sub, pop3 = config.smtp, config.submission, config.pop3
    return {
        "smtp": ConnectionLimiter(smtp.max_connections, smtp.max_connections_per_ip),
        "submission": ConnectionLimiter(sub.max_connections, sub.max_connections_per_ip),
        "pop3": ConnectionLimiter(pop3.max_connections, pop3.max_connections_per_ip),
    }
