# -*- test-case-name: tests.auth.test_cache -*-
"""Verified logins remembered for a while, so a login need not cost an Argon2 check each time.

Applications that open one connection per message (web frameworks' default
mail backends, cron scripts) log in once per message; at ~25 ms of CPU per
Argon2id verification and four at once, that caps them at a few dozen
messages per second.  Dovecot answers this with an auth cache; this is the same
idea, kept behind the ``twisted.cred`` checker so the protocols do not see it.

What is kept, per user key: ``HMAC-SHA256(secret, user key, stored hash,
password)`` and the time it expires.  ``secret`` is 32 random bytes drawn when
the process starts, so the table is useless outside it, and the password itself
is never kept.  A login is a hit when the HMAC over what it presents, with the
hash stored *now*, equals the entry (``hmac.compare_digest``) and the entry has
not expired; a hit costs one HMAC on the reactor thread and no pool thread.

* Invalidation: the stored hash is part of the HMAC input, and every password
  change stores a new PHC string (fresh salt); the user database re-reads its
  file whenever it changes.  So after a password change the old password no
  longer matches, and a deleted user (no stored hash) never hits.
* Only successes are remembered: a wrong password always gets the full check
  (and the login throttle, consulted before the checker, counts it).
* Time to live: from the verification, not from the last hit, so a remembered
  password is checked against Argon2 again at least once per ``ttl``.
* Bound: at most ``max_entries`` users (least recently used dropped first).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

#: Users remembered at most (about 150 bytes each).
MAX_ENTRIES = 10_000


class LoginCache:
    """Per-user HMAC of the last verified password, for ``ttl`` seconds; ``ttl`` 0 keeps nothing."""

    def __init__(self, clock: IReactorTime, ttl: float, max_entries: int = MAX_ENTRIES) -> None:
        self.clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self._secret = os.urandom(32)
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, key: str, stored: str, password: bytes) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (key.encode("utf-8"), stored.encode("utf-8"), password):
            mac.update(len(part).to_bytes(4, "big"))  # unambiguous: no part can run into the next
            mac.update(part)
        return mac.digest()

    def hit(self, key: str, stored: str | None, password: bytes) -> bool:
        """Whether ``password`` was verified for ``key`` within ``ttl`` while its hash was ``stored``."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        digest, expires = entry
        if stored is None or self.clock.seconds() >= expires:
            del self._entries[key]
            return False
        if not hmac.compare_digest(digest, self._digest(key, stored, password)):
            return False
        self._entries.move_to_end(key)
        return True

    def remember(self, key: str, stored: str, password: bytes) -> None:
        """Record that ``password`` was verified for ``key`` against the hash ``stored``."""
        if self.ttl <= 0:
            return
        self._entries[key] = (self._digest(key, stored, password), self.clock.seconds() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
