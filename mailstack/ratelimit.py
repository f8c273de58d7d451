# -*- test-case-name: tests.test_ratelimit -*-
"""Events per key over a rolling window, in memory (the per-client message rate
of the MX listener, ``inbound.max_messages_per_minute``).

A restart forgets the counts: the limit is a brake on a flood, not accounting
(the per-user sending limits, which must survive restarts, are ``sendlimits``).
``admit`` is the ``interfaces.IRateLimit`` seam: with several worker processes
the master keeps the one limiter and the workers ask it over AMP
(``procs.stateserver``); here it answers at once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailstack.interfaces import IRateLimit


@implementer(IRateLimit)
class RateLimiter:
    """At most ``limit`` events per ``window`` seconds per key; ``limit`` 0 means none."""

    def __init__(self, clock: Any, limit: int, window: float = 3600.0) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self._events: dict[str, deque[float]] = {}

    def _prune(self, key: str) -> deque[float] | None:
        q = self._events.get(key)
        if q is None:
            return None
        horizon = self._clock.seconds() - self.window
        while q and q[0] <= horizon:
            q.popleft()
        if not q:
            del self._events[key]
            return None
        return q

    def allowed(self, key: str) -> bool:
        """Whether ``key`` may send one more message now."""
        if not self.limit:
            return True
        q = self._prune(key)
        return q is None or len(q) < self.limit

    def record(self, key: str) -> None:
        """Count one message sent by ``key`` now."""
        if not self.limit:
            return
        self._prune(key)
        self._events.setdefault(key, deque()).append(self._clock.seconds())

    def admit(self, key: str) -> Deferred[bool]:
        """Count one event of ``key`` if it is under the limit; whether it was."""
        allowed = self.allowed(key)
        if allowed:
            self.record(key)
        return succeed(allowed)

    def count(self, key: str) -> int:
        q = self._prune(key)
        return 0 if q is None else len(q)
