# -*- test-case-name: tests.queue.test_manager -*-
"""Outbound connection slots: a global cap and a per-domain cap (0: unlimited).

``relay.max_connections`` and ``relay.max_per_domain``, as Postfix's
``default_destination_concurrency_limit``.  Waiters for a domain are served
in order, and a domain with waiters takes no slot ahead of them.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed


class Slots:
    """Connection slots; ``acquire(domain)`` fires True when one is free, False on shutdown."""

    def __init__(self, total: int, per_domain: int) -> None:
        self.total = total
        self.per_domain = per_domain
        self.used = 0
        self.by_domain: dict[str, int] = {}
        self._waiting: list[tuple[str, Deferred[bool]]] = []

    def _fits(self, domain: str) -> bool:
        if self.total and self.used >= self.total:
            return False
        if self.per_domain and self.by_domain.get(domain, 0) >= self.per_domain:
            return False
        return True

    def _take(self, domain: str) -> None:
        self.used += 1
        self.by_domain[domain] = self.by_domain.get(domain, 0) + 1

    def acquire(self, domain: str) -> Deferred[bool]:
        if self._fits(domain) and not any(d == domain for d, _ in self._waiting):
            self._take(domain)
            return succeed(True)
        d: Deferred[bool] = Deferred()
        self._waiting.append((domain, d))
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
        i = 0
        while i < len(self._waiting):
            if self.total and self.used >= self.total:
                return
            domain, d = self._waiting[i]
            if self._fits(domain):
                del self._waiting[i]
                self._take(domain)
                d.callback(True)
            else:
                i += 1

    def cancel_all(self) -> None:
        """Shutting down: every waiter gets False and must not connect."""
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.callback(False)
