# -*- test-case-name: tests.test_sendlimits -*-
"""Per-user sending limits (``[limits]``), counted across restarts.

An authenticated user may send at most ``limits.messages_per_hour`` messages
in the last hour and ``limits.messages_per_day`` in the last 24 hours (0: no
limit); ``mailstack user limit`` overrides either for one user.  A message
counts once, whatever its number of recipients, when it is accepted.

**Windows.**  Both are sliding, in steps: the hour is the current minute plus
the 59 before it (a message counts for 59 to 60 minutes) and the day is the
current clock hour plus the 23 before it (23 to 24 hours), kept as per-minute
and per-hour counters.  mox likewise counts the last 24 hours; Postfix's
anvil(8) uses fixed windows (``anvil_rate_time_unit``), which let a client
send twice the limit across a window boundary.  "Today" in ``user list``
means this 24-hour window.

**Reservation.**  ``reserve(user)`` at MAIL FROM holds one message against the
limits until ``commit()`` (after the 250 for the message) or ``release()``
(RSET, a failed transaction, a dropped connection).  Held messages count, so
ten concurrent sessions of one user cannot overshoot the limit by ten.
``reserve`` answers through a Deferred (``interfaces.ISendLimits``): with
several worker processes the master keeps the one ``SendLimits`` and the
workers ask it over AMP (``procs.stateserver``); here it answers at once.  A
refusal is 451 4.7.1 naming the limit (RFC 3463: 4.7.1 "delivery not
authorized"; temporary, the sender may retry when the window has moved on).

**Files** (under ``data_dir``):

- ``limits.json``: per-user overrides, written only by the admin command
  (``jsonfile.JSONFile``: locked, atomic) and re-read by a running server
  when it changes, like ``users.json``::

      {"version": 1, "limits": {"alice@example.org": {"per_hour": 10, "per_day": 50}}}

- ``sendcounts.json``: the counters, written by the server only, batched:
  a change schedules one write ``FLUSH_DELAY`` seconds later through
  ``run_blocking`` (tmp, fsync, rename, fsync dir); no disk write happens per
  message, and a crash loses at most those seconds of counts.  Read once at
  start (before the reactor runs) and by ``mailstack user list --json``::

      {"version": 1, "counts": {"alice@example.org": {"m": {"29890123": 2}, "h": {"498168": 7}}}}

  ``m`` maps minute numbers (Unix time // 60) and ``h`` hour numbers (// 3600)
  to messages sent in that minute or hour.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.auth.jsonfile import FileFormatError, JSONFile
from mailstack.errors import Reply
from mailstack.interfaces import IReservation, ISendLimits
from mailstack.storage import fsutil

LIMITS_FILE = "limits.json"
COUNTS_FILE = "sendcounts.json"
FORMAT_VERSION = 1
FLUSH_DELAY = 2.0  # seconds of counts a crash may lose

MINUTE, HOUR = 60, 3600
HOUR_MINUTES, DAY_HOURS = 60, 24

HOURLY_LIMIT_REACHED = "Hourly sending limit of {limit} messages reached, try again later"
DAILY_LIMIT_REACHED = "Daily sending limit of {limit} messages reached, try again later"


@dataclass(frozen=True)
class Usage:
    """One user's counts and effective limits (0: no limit), as ``user list --json`` shows them."""

    sent_last_hour: int
    sent_today: int
    limit_per_hour: int
    limit_per_day: int


class Counts:
    """One user's per-minute and per-hour message counters."""

    def __init__(self, minutes: dict[int, int] | None = None, hours: dict[int, int] | None = None) -> None:
        self.minutes = minutes or {}
        self.hours = hours or {}

    def add(self, now: float, n: int = 1) -> None:
        minute, hour = int(now // MINUTE), int(now // HOUR)
        self.minutes[minute] = self.minutes.get(minute, 0) + n
        self.hours[hour] = self.hours.get(hour, 0) + n

    def prune(self, now: float) -> bool:
        """Forget counters outside both windows; whether anything is left."""
        first_minute = int(now // MINUTE) - HOUR_MINUTES + 1
        first_hour = int(now // HOUR) - DAY_HOURS + 1
        self.minutes = {m: n for m, n in self.minutes.items() if m >= first_minute}
        self.hours = {h: n for h, n in self.hours.items() if h >= first_hour}
        return bool(self.minutes or self.hours)

    def last_hour(self, now: float) -> int:
        first = int(now // MINUTE) - HOUR_MINUTES + 1
        return sum(n for m, n in self.minutes.items() if m >= first)

    def last_day(self, now: float) -> int:
        first = int(now // HOUR) - DAY_HOURS + 1
        return sum(n for h, n in self.hours.items() if h >= first)

    def to_json(self) -> dict[str, dict[str, int]]:
        return {"m": {str(k): v for k, v in self.minutes.items()}, "h": {str(k): v for k, v in self.hours.items()}}

    @classmethod
    def from_json(cls, doc: Any) -> Counts:
        if not isinstance(doc, dict):
            raise TypeError("not an object")
        return cls(
            {int(k): int(v) for k, v in doc.get("m", {}).items()},
            {int(k): int(v) for k, v in doc.get("h", {}).items()},
        )


def read_counts(path: str) -> dict[str, Counts]:
    """The counters in ``path`` ({} if missing); FileFormatError if unreadable."""
    try:
        raw = fsutil.read_small(path)
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(raw.decode("utf-8"))
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported version {doc.get('version')!r}")
        return {str(user): Counts.from_json(c) for user, c in doc["counts"].items()}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FileFormatError(f"{path}: not a send counts file: {e}") from None


def encode_counts(counts: Mapping[str, Counts]) -> bytes:
    doc = {"version": FORMAT_VERSION, "counts": {u: c.to_json() for u, c in sorted(counts.items())}}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8") + b"\n"


class LimitsFile:
    """``data_dir/limits.json``: per-user overrides of the configured limits."""

    def __init__(self, data_dir: str) -> None:
        self._file = JSONFile(
            os.path.join(data_dir, LIMITS_FILE), os.path.join(data_dir, "limits.lock"), "limits", FORMAT_VERSION
        )

    def override(self, user: str) -> dict[str, int]:
        """``{"per_hour": N, "per_day": N}``, either key absent when not overridden."""
        record = self._file.current().get(user)
        return dict(record) if isinstance(record, dict) else {}

    def set(self, user: str, **values: int | None) -> None:
        """Set ``per_hour``/``per_day`` (an int) or reset it to the default (None)."""

        def change(table: dict[str, Any]) -> None:
            record = dict(table.get(user) or {})
            for key, value in values.items():
                if value is None:
                    record.pop(key, None)
                else:
                    record[key] = int(value)
            if record:
                table[user] = record
            else:
                table.pop(user, None)

        self._file.update(change)

    def effective(self, user: str, per_hour: int, per_day: int) -> tuple[int, int]:
        """The limits that apply to ``user`` given the configured defaults."""
        record = self.override(user)
        return int(record.get("per_hour", per_hour)), int(record.get("per_day", per_day))


def usage_report(data_dir: str, users: list[str], per_hour: int, per_day: int, now: float) -> dict[str, Usage]:
    """Counts as last written by the server, and limits, for the admin command."""
    counts = read_counts(os.path.join(data_dir, COUNTS_FILE))
    limits = LimitsFile(data_dir)
    report = {}
    for user in users:
        c = counts.get(user) or Counts()
        hourly, daily = limits.effective(user, per_hour, per_day)
        report[user] = Usage(c.last_hour(now), c.last_day(now), hourly, daily)
    return report


@implementer(IReservation)
class Reservation:
    """One message held against a user's limits from MAIL until commit or release."""

    def __init__(self, owner: SendLimits, user: str) -> None:
        self._owner = owner
        self.user = user
        self._open = True

    def commit(self) -> None:
        """The message was accepted: count it (once)."""
        if self._open:
            self._open = False
            self._owner._commit(self.user)

    def release(self) -> None:
        """The transaction ended without a message: free the hold (no-op after commit)."""
        if self._open:
            self._open = False
            self._owner._release(self.user)


@implementer(ISendLimits)
class SendLimits(Service):
    """The running server's limiter; a child service so the last counts are written at stop.

    Built before the reactor runs (it reads ``sendcounts.json`` at once, so
    that the first MAIL after a restart already sees the old counts).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        run_blocking: Callable[..., Deferred],
        data_dir: str,
        per_hour: int,
        per_day: int,
        flush_delay: float = FLUSH_DELAY,
    ) -> None:
        self.clock = clock
        self.run_blocking = run_blocking
        self.path = os.path.join(data_dir, COUNTS_FILE)
        self.per_hour = per_hour
        self.per_day = per_day
        self.flush_delay = flush_delay
        self.overrides = LimitsFile(data_dir)
        self.counts = read_counts(self.path)
        self.held: dict[str, int] = {}
        self._flush_call: IDelayedCall | None = None
        self._writing: Deferred | None = None
        self._dirty = False

    # -- the SMTP session's side -----------------------------------------------

    def reserve(self, user: str) -> Deferred[Reply | Reservation]:
        """A Reservation, or the 451 4.7.1 Reply naming the limit that is reached."""
        return succeed(self._reserve(user))

    def _reserve(self, user: str) -> Reply | Reservation:
        hourly, daily = self.overrides.effective(user, self.per_hour, self.per_day)
        if hourly or daily:
            now = self.clock.seconds()
            counts = self.counts.get(user) or Counts()
            held = self.held.get(user, 0)
            if hourly and counts.last_hour(now) + held >= hourly:
                return Reply(451, "4.7.1", HOURLY_LIMIT_REACHED.format(limit=hourly))
            if daily and counts.last_day(now) + held >= daily:
                return Reply(451, "4.7.1", DAILY_LIMIT_REACHED.format(limit=daily))
        self.held[user] = self.held.get(user, 0) + 1
        return Reservation(self, user)

    def usage(self, user: str) -> Usage:
        now = self.clock.seconds()
        counts = self.counts.get(user) or Counts()
        hourly, daily = self.overrides.effective(user, self.per_hour, self.per_day)
        return Usage(counts.last_hour(now), counts.last_day(now), hourly, daily)

    def _release(self, user: str) -> None:
        left = self.held.get(user, 0) - 1
        if left > 0:
            self.held[user] = left
        else:
            self.held.pop(user, None)

    def _commit(self, user: str) -> None:
        self._release(user)
        self.counts.setdefault(user, Counts()).add(self.clock.seconds())
        self._dirty = True
        if self._flush_call is None and self.running:
            self._flush_call = self.clock.callLater(self.flush_delay, self._scheduled_flush)

    # -- persistence --------------------------------------------------------------

    def _scheduled_flush(self) -> None:
        self._flush_call = None
        self.flush()

    def flush(self) -> Deferred:
        """Write the counters if they changed; fires when written (or failed, logged)."""
        if self._writing is not None:
            # One write at a time; the changes since go out right after it.
            return self._writing.addCallback(lambda _: self.flush())
        if not self._dirty:
            return succeed(None)
        self._dirty = False
        now = self.clock.seconds()
        self.counts = {u: c for u, c in self.counts.items() if c.prune(now)}
        body = encode_counts(self.counts)
        d = self.run_blocking(fsutil.write_atomic, self.path, body)

        def failed(failure: Any) -> None:
            self._dirty = True  # try again with the next change or at stop
            self.log.failure("cannot write {path}", failure, path=self.path)

        def done(_: Any) -> None:
            self._writing = None

        d.addErrback(failed)
        d.addBoth(done)
        if not d.called:
            self._writing = d
        return d

    def startService(self) -> None:
        super().startService()
        if self._dirty and self._flush_call is None:
            self._flush_call = self.clock.callLater(self.flush_delay, self._scheduled_flush)

    def stopService(self) -> Deferred:
        """Write what is left; the thread pool must still run (stop this service before it)."""
        super().stopService()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        return self.flush()
