# -*- test-case-name: tests.auth.test_throttle -*-
"""Brute-force slowdown and lockout shared by SMTP AUTH and POP3 logins.

Each failed login from a peer (client IP) doubles the delay before the failure
reply, from ``auth.failure_delay`` up to ``auth.max_failure_delay`` (the
security considerations of RFC 1939, section 13, and of RFC 4954 warn of
password guessing over these protocols).
After ``auth.lockout_failures`` failures from one peer, or against one account
from anywhere (a distributed guess), logins from that peer or to that account are
refused for ``auth.lockout_time``.  Failures older than ``lockout_time`` are
forgotten, so the tables stay small; a success forgets the peer's failures.
State is in memory only: a restart forgives everyone, which is acceptable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.interfaces import ILoginThrottle

# Prune forgotten records when a table grows past this, so a scan of many
# addresses cannot grow memory without bound.
_PRUNE_AT = 10000


@dataclass
class _Record:
    failures: int
    last: float


@implementer(ILoginThrottle)
class LoginThrottle:
    """Per-peer delays, per-peer and per-account lockouts, on an injected clock."""

    log = Logger()

    def __init__(self, clock: IReactorTime, auth: Any) -> None:
        self.clock = clock
        self.failure_delay = auth.failure_delay
        self.max_failure_delay = auth.max_failure_delay
        self.lockout_failures = auth.lockout_failures
        self.lockout_time = auth.lockout_time
        self._peers: dict[str, _Record] = {}
        self._accounts: dict[str, _Record] = {}

    def _live(self, table: dict[str, _Record], name: str, now: float) -> _Record | None:
        record = table.get(name)
        if record is not None and now - record.last >= self.lockout_time:
            del table[name]
            return None
        return record

    def _is_locked(self, record: _Record | None) -> bool:
        return record is not None and 0 < self.lockout_failures <= record.failures

    def locked(self, peer: str, account: str) -> bool:
        now = self.clock.seconds()
        return self._is_locked(self._live(self._peers, peer, now)) or self._is_locked(
            self._live(self._accounts, account, now)
        )

    def failed(self, peer: str, account: str) -> float:
        now = self.clock.seconds()
        for table, name in ((self._peers, peer), (self._accounts, account)):
            record = self._live(table, name, now)
            if record is None:
                if len(table) >= _PRUNE_AT:
                    self._prune(table, now)
                record = table[name] = _Record(0, now)
            record.failures += 1
            record.last = now
            if record.failures == self.lockout_failures:
                self.log.warn(
                    "login lockout for {peer} / {user} after {failures} failures",
                    peer=peer,
                    user=account,
                    failures=record.failures,
                )
        failures = self._peers[peer].failures
        return min(self.failure_delay * 2 ** min(failures - 1, 62), self.max_failure_delay)

    def succeeded(self, peer: str, account: str) -> None:
        self._peers.pop(peer, None)

    def _prune(self, table: dict[str, _Record], now: float) -> None:
        for name in [n for n, r in table.items() if now - r.last >= self.lockout_time]:
            del table[name]
