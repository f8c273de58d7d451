# -*- test-case-name: tests.inbound.test_greylist -*-
"""Greylisting: the first attempt of an unknown (client network, sender,
recipient) triplet is deferred; a retry after ``delay`` passes.

* The client network is the /24 of an IPv4 address or the /64 of an IPv6
  one, because large senders retry from another address of the same pool.
* A triplet that passed is known for ``retention`` (30 days) after it was
  last seen, so regular correspondents are delayed once.  A triplet that never
  came back is forgotten after ``retry_window``.
* At most ``max_entries`` triplets are kept; the least recently seen go first.
* The table lives in memory and is written to ``path`` (JSON, replaced
  atomically with ``storage.fsutil.write_atomic``) every ``flush_interval``
  seconds when it changed, and when the service stops: never one write per
  message, and never on the reactor thread (reads and writes go through
  ``run_blocking``).  A crash loses at most the last interval's changes,
  which only means one more deferral.

``Greylist`` is an ``IService``: ``startService`` loads the file;
``check(ip, sender, recipient)`` waits for that load, then fires True (may
pass now) or False (answer 451 4.7.1).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import OrderedDict
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.inbound.interfaces import IGreylist
from mailstack.storage import fsutil

DAY = 86400.0
RETENTION = 30 * DAY
RETRY_WINDOW = 2 * DAY
MAX_ENTRIES = 200_000
FLUSH_INTERVAL = 30.0
PURGE_INTERVAL = 3600.0
FORMAT_VERSION = 1

Key = tuple[str, str, str]
# (first seen, last seen, passed)
Entry = tuple[float, float, bool]


def network(ip: str) -> str:
    """The client's /24 (IPv4) or /64 (IPv6) as text; an unparsable address as is."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def load_file(path: str) -> list[tuple[Key, Entry]]:
    """Blocking: the saved entries ([] when there is no file)."""
    try:
        data = json.loads(fsutil.read_small(path))
    except FileNotFoundError:
        return []
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown greylist format {data.get('version')!r}")
    return [((n, s, r), (float(f), float(la), bool(p))) for n, s, r, f, la, p in data["entries"]]


def save_file(path: str, entries: list[tuple[Key, Entry]]) -> None:
    """Blocking: replace ``path`` with ``entries`` (durable, atomic)."""
    rows = [[n, s, r, f, la, p] for (n, s, r), (f, la, p) in entries]
    fsutil.ensure_dir(os.path.dirname(os.path.abspath(path)))
    fsutil.write_atomic(path, json.dumps({"version": FORMAT_VERSION, "entries": rows}).encode())


@implementer(IGreylist)
class Greylist(Service):
    """The greylisting table; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        run_blocking: Callable[..., Deferred],
        delay: float,
        retention: float = RETENTION,
        retry_window: float = RETRY_WINDOW,
        max_entries: int = MAX_ENTRIES,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.path = path
        self.clock = clock
        self.run_blocking = run_blocking
        self.delay = delay
        self.retention = retention
        self.retry_window = retry_window
        self.max_entries = max_entries
        self.flush_interval = flush_interval
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self._loaded = False
        self._waiting: list[tuple[Key, Deferred[bool]]] = []
        self._dirty = False
        self._writing: Deferred[None] | None = None
        self._last_purge = 0.0
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock

    # --- IService -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.run_blocking(load_file, self.path).addCallbacks(self._restore, self._load_failed).addBoth(self._release)
        self._flusher.start(self.flush_interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._flusher.running:
            self._flusher.stop()
        return Deferred.fromCoroutine(self._final_flush())

    async def _final_flush(self) -> None:
        if self._writing is not None:
            await self._writing
        if self._dirty:
            await self.flush()

    def _restore(self, rows: list[tuple[Key, Entry]]) -> None:
        rows.sort(key=lambda kv: kv[1][1])  # least recently seen first
        now = self.clock.seconds()
        for key, entry in rows:
            if not self._expired(entry, now):
                self.entries[key] = entry
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        self.log.info("greylist: {count} triplets loaded", count=len(self.entries))

    def _load_failed(self, failure: Failure) -> None:
        # An unreadable table only means some senders are delayed once more.
        self.log.failure("greylist: cannot read {path}; starting empty", failure, path=self.path)

    def _release(self, _: None) -> None:
        """Answer the checks that arrived while the table was loading."""
        self._loaded = True
        waiting, self._waiting = self._waiting, []
        for key, d in waiting:
            d.callback(self._check(key))

    # --- The check ------------------------------------------------------------

    def _expired(self, entry: Entry, now: float) -> bool:
        first, last, passed = entry
        return (now - last > self.retention) if passed else (now - first > self.retry_window)

    def check(self, ip: str, sender: str, recipient: str) -> Deferred[bool]:
        """Deferred True when the triplet may pass now (RFC 5321 4.2.5: the
        deferral is a 4xx the sender retries)."""
        key = (network(ip), sender.lower(), recipient.lower())
        if self.running and not self._loaded:
            d: Deferred[bool] = Deferred()
            self._waiting.append((key, d))
            return d
        return succeed(self._check(key))

    def _check(self, key: Key) -> bool:
        now = self.clock.seconds()
        entry = self.entries.pop(key, None)
        if entry is not None and self._expired(entry, now):
            entry = None
        if entry is None:
            entry, passed = (now, now, False), False
        else:
            first, _, known = entry
            passed = known or now - first >= self.delay
            entry = (first, now, passed)
        self.entries[key] = entry  # re-inserted last: most recently seen
        self._dirty = True
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return passed

    # --- Persistence ----------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """Write the table if it changed and no write is running; expired
        entries are dropped first, at most every PURGE_INTERVAL."""
        if not self._dirty or self._writing is not None:
            return succeed(None)
        now = self.clock.seconds()
        if now - self._last_purge >= PURGE_INTERVAL:
            self._last_purge = now
            for key in [k for k, e in self.entries.items() if self._expired(e, now)]:
                del self.entries[key]
        self._dirty = False
        snapshot = list(self.entries.items())  # tuples: safe to serialise in a thread
        self._writing = self.run_blocking(save_file, self.path, snapshot)
        return self._writing.addCallbacks(self._written, self._write_failed)

    def _written(self, _: None) -> None:
        self._writing = None

    def _write_failed(self, failure: Failure) -> None:
        self._writing = None
        self._dirty = True  # tried again at the next interval
        self.log.failure("greylist: cannot write {path}", failure, path=self.path)
