# -*- test-case-name: tests.queue.test_slots -*-
"""Outbound connection slots: a global cap and a per-domain cap (0: unlimited).

``relay.max_connections`` and ``relay.max_per_domain``, as Postfix's
``default_destination_concurrency_limit``.  Waiters for a domain are served
in order, and a domain with waiters takes no slot ahead of them.  When the
global cap frees a slot, the earliest waiter whose domain is below its own cap
gets it.

Waiters are kept in one queue per domain, so a release looks at the domains
that have waiters, not at every waiter: with a backlog of hundreds of entries
for one domain (a burst to one smarthost), a release is a constant amount of
work instead of a scan of the whole backlog.
"""

from __future__ import annotations

import itertools
from collections import deque

from twisted.internet.defer import Deferred, succeed


class Slots:
    """Connection slots; ``acquire(domain)`` fires True when one is free, False on shutdown."""

    def __init__(self, total: int, per_domain: int) -> None:
        self.total = total
        self.per_domain = per_domain
        self.used = 0
        self.by_domain: dict[str, int] = {}
        # domain -> its waiters in arrival order (sequence number, Deferred); no empty queues
        self._waiting: dict[str, deque[tuple[int, Deferred[bool]]]] = {}
        self._arrivals = itertools.count()

    def _domain_fits(self, domain: str) -> bool:
        return not self.per_domain or self.by_domain.get(domain, 0) < self.per_domain

    def _full(self) -> bool:
        return bool(self.total) and self.used >= self.total

    def _take(self, domain: str) -> None:
        self.used += 1
        self.by_domain[domain] = self.by_domain.get(domain, 0) + 1

    def acquire(self, domain: str) -> Deferred[bool]:
        if not self._full() and self._domain_fits(domain) and domain not in self._waiting:
            self._take(domain)
            return succeed(True)
        d: Deferred[bool] = Deferred()
        self._waiting.setdefault(domain, deque()).append((next(self._arrivals), d))
        return d

    def release(self, domain: str) -> None:
        self.used -= 1
        n = self.by_domain.get(domain, 0) - 1
        if n > 0:
            self.by_domain[domain] = n
        else:
            self.by_domain.pop(domain, None)
        self._wake()

    def _wake(self) -> None:
        """Give free slots to the earliest waiters whose domain fits.

        Looks again after each grant: the granted waiter runs at once and may
        release or acquire slots itself."""
        while not self._full():
            best: str | None = None
            first = 0
            for domain, queue in self._waiting.items():
                if (best is None or queue[0][0] < first) and self._domain_fits(domain):
                    best, first = domain, queue[0][0]
            if best is None:
                return
            queue = self._waiting[best]
            _, d = queue.popleft()
            if not queue:
                del self._waiting[best]
            self._take(best)
            d.callback(True)

    def cancel_all(self) -> None:
        """Shutting down: every waiter gets False and must not connect."""
        waiting = sorted(w for queue in self._waiting.values() for w in queue)
        self._waiting = {}
        for _, d in waiting:
            d.callback(False)
