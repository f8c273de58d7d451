# -*- test-case-name: tests.auth.test_throttle -*-
"""Brute-force slowdown and lockout shared by SMTP AUTH and POP3 logins.

The security considerations of RFC 1939 (section 13) and RFC 4954 (section 9)
warn of password guessing over these protocols.  The rules:

* A **peer** (client address; IPv6 by its /64, which one host usually owns
  whole) is refused once it has ``auth.lockout_failures`` failed or unfinished
  attempts, whatever accounts they named.  A success does not reset this count,
  so one valid account does not buy an attacker more guesses for others.
* A **(peer, account) pair** is refused at the same count; a success from that
  pair forgets the pair's failures (the user mistyped, then got it right).
* An **account** alone is never refused: whoever could name it could otherwise
  lock its owner out.  Once it has ``lockout_failures`` failed or unfinished
  attempts from anywhere, each further attempt waits before its password is
  checked, ``auth.failure_delay`` doubling per attempt up to
  ``auth.max_failure_delay``: a guesser spread over many addresses is slowed,
  and the wait comes before the check, so its length says nothing about the
  password.
* A peer that logged in to an account within ``trust_time`` is *known* for it:
  it is neither slowed by the account's count nor refused by its own peer count
  (a colleague behind the same NAT as a guesser still gets in).  Only the
  pair's own count, which its last success reset, can refuse it.
* Each failure's reply waits ``failure_delay`` doubling per failure of that
  peer, up to ``max_failure_delay``.

Attempts count from ``begin``, before the (asynchronous) password check, so
thirty parallel attempts against a limit of ten get ten checks.  Counts are
forgotten ``auth.lockout_time`` after a record's last attempt, so a lockout
lasts that long after the last refused or failed try.  The interface is
asynchronous (with several worker processes the master keeps the one
throttle, ``procs.stateserver``); this one answers at once.  Every table is an LRU
bounded by ``max_entries`` and keyed by a short hash of the login name, so a
scan of many addresses or names cannot grow memory without bound.  State is in
memory only: a restart forgives everyone, which is acceptable.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.interfaces import ILoginThrottle, ILoginTicket
from mailstack.logsafe import escape

#: Entries per table; the oldest is dropped beyond this (about 100 bytes each).
MAX_ENTRIES = 50_000
#: How long a successful login makes the peer known for that account.
TRUST_TIME = 30 * 24 * 3600.0
#: IPv6 peers are counted per prefix of this length (RFC 4291 section 2.5.4:
#: the interface identifier is 64 bits, so one host or LAN owns a whole /64).
IPV6_PREFIX = 64

K = TypeVar("K", bound=Hashable)


@functools.lru_cache(maxsize=4096)
def peer_key(peer: str) -> str:
    """The throttle's key for a client address: the IPv4 address or the IPv6 /64.

    Cached: every login asks for it several times (begin, then the verdict),
    and parsing the address is most of the throttle's work."""
    try:
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return "?" + peer[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def account_key(account: str) -> bytes:
    """A short fixed-size key for a login name, however long the peer made it."""
    return hashlib.blake2b(account.casefold().encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass
class _Count:
    failures: int = 0
    pending: int = 0  # attempts begun and not yet finished
    last: float = 0.0


class _Table(Generic[K]):
    """Counts by key, forgotten ``ttl`` after their last use, at most ``cap`` of them (LRU)."""

    def __init__(self, ttl: float, cap: int) -> None:
        self.ttl = ttl
        self.cap = cap
        self._items: OrderedDict[K, _Count] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, now: float) -> _Count | None:
        count = self._items.get(key)
        if count is not None and now - count.last >= self.ttl:
            del self._items[key]
            return None
        return count

    def touch(self, key: K, now: float) -> _Count:
        """The live count for ``key`` (created if need be), marked used at ``now``."""
        count = self.get(key, now)
        if count is None:
            count = self._items[key] = _Count()
            if len(self._items) > self.cap:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        count.last = now
        return count

    def discard(self, key: K) -> None:
        self._items.pop(key, None)


@implementer(ILoginTicket)
class _Ticket:
    """One reserved attempt; the first of succeeded/failed/abandoned ends it."""

    def __init__(self, throttle: LoginThrottle, peer: str, account: str, delay: float, counts: list[_Count]) -> None:
        self.delay = delay
        self._throttle = throttle
        self._peer = peer
        self._account = account
        self._counts: list[_Count] | None = counts

    def _release(self) -> bool:
        if self._counts is None:
            return False
        for count in self._counts:
            count.pending = max(count.pending - 1, 0)
        self._counts = None
        return True

    def succeeded(self) -> None:
        if self._release():
            self._throttle._record_success(self._peer, self._account)

    def failed(self) -> Deferred[float]:
        if not self._release():
            return succeed(0.0)
        return succeed(self._throttle._record_failure(self._peer, self._account))

    def abandoned(self) -> None:
        self._release()


@implementer(ILoginThrottle)
class LoginThrottle:
    """Peer and pair lockouts, account slowdown, known peers; on an injected clock."""

    log = Logger()

    def __init__(
        self, clock: IReactorTime, auth: Any, trust_time: float = TRUST_TIME, max_entries: int = MAX_ENTRIES
    ) -> None:
        self.clock = clock
        self.failure_delay: float = auth.failure_delay
        self.max_failure_delay: float = auth.max_failure_delay
        self.limit: int = auth.lockout_failures
        window: float = auth.lockout_time
        self._peers: _Table[str] = _Table(window, max_entries)
        self._pairs: _Table[tuple[str, bytes]] = _Table(window, max_entries)
        self._accounts: _Table[bytes] = _Table(window, max_entries)
        self._known: _Table[tuple[str, bytes]] = _Table(trust_time, max_entries)

    # -- ILoginThrottle ------------------------------------------------------------

    def begin(self, peer: str, account: str) -> Deferred[ILoginTicket | None]:
        now = self.clock.seconds()
        refusal = self._refusal(peer, account, now)
        if refusal:
            self.log.info(
                "login refused for {peer} / {user}: {why}",
                peer=escape(peer, 100),
                user=escape(account, 100),
                why=refusal,
            )
            return succeed(None)
        return succeed(self._reserve(peer, account, now))

    # -- the rules -----------------------------------------------------------------

    def _over(self, count: _Count | None) -> bool:
        return count is not None and 0 < self.limit <= count.failures + count.pending

    def _refusal(self, peer: str, account: str, now: float) -> str | None:
        p = peer_key(peer)
        pair = (p, account_key(account))
        if self._over(self._pairs.get(pair, now)):
            return "too many failures for this account from this address"
        if self._known.get(pair, now) is None and self._over(self._peers.get(p, now)):
            return "too many failures from this address"
        return None

    def _doubling(self, n: int) -> float:
        """``failure_delay`` doubled ``n`` times, at most ``max_failure_delay``."""
        return float(min(self.failure_delay * 2 ** min(n, 62), self.max_failure_delay))

    def _reserve(self, peer: str, account: str, now: float) -> _Ticket:
        p, a = peer_key(peer), account_key(account)
        by_account = self._accounts.touch(a, now)
        delay = 0.0
        excess = by_account.failures + by_account.pending - self.limit
        if self.limit > 0 and excess >= 0 and self._known.get((p, a), now) is None:
            delay = self._doubling(excess)
        counts = [self._peers.touch(p, now), self._pairs.touch((p, a), now), by_account]
        for count in counts:
            count.pending += 1
        return _Ticket(self, peer, account, delay, counts)

    def _record_failure(self, peer: str, account: str) -> float:
        now = self.clock.seconds()
        p, a = peer_key(peer), account_key(account)
        by_peer = self._peers.touch(p, now)
        by_pair = self._pairs.touch((p, a), now)
        self._accounts.touch(a, now).failures += 1
        by_peer.failures += 1
        by_pair.failures += 1
        if self.limit in (by_peer.failures, by_pair.failures):
            self.log.warn(
                "login lockout for {peer} / {user} after {failures} failures from that address",
                peer=escape(peer, 100),
                user=escape(account, 100),
                failures=by_peer.failures,
            )
        return self._doubling(by_peer.failures - 1)

    def _record_success(self, peer: str, account: str) -> None:
        now = self.clock.seconds()
        p, a = peer_key(peer), account_key(account)
        self._pairs.discard((p, a))
        self._known.touch((p, a), now)
