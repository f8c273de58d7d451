# -*- test-case-name: tests.queue.test_schedule -*-
"""Retry timing: pure functions of attempts, intervals, ``now`` and an ``rng``.

Nothing here reads the clock; the queue manager passes ``clock.seconds()`` in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mailstack.queue.entry import FAILED, QueueEntry

# Jitter spreads retries of many messages deferred at the same moment (a remote
# outage) so they do not all reconnect in the same second.  Small and positive:
# a retry never happens before its nominal interval.
JITTER_FRACTION = 0.1
MAX_JITTER = 300.0


def interval_for(attempts: int, intervals: Sequence[float]) -> float:
    """The wait after the ``attempts``-th attempt; the last interval repeats."""
    if not intervals:
        raise ValueError("no retry intervals")
    index = max(attempts, 1) - 1
    return float(intervals[min(index, len(intervals) - 1)])


def next_attempt(
    attempts: int,
    intervals: Sequence[float],
    now: float,
    rng: random.Random | None = None,
) -> float:
    """When to try again after ``attempts`` attempts (counting the one just made).

    ``now + interval + jitter`` where jitter is uniform in
    ``[0, min(10% of the interval, 300 s)]``; ``rng=None`` means no jitter.
    """
    interval = interval_for(attempts, intervals)
    jitter = 0.0
    if rng is not None:
        jitter = rng.uniform(0.0, min(interval * JITTER_FRACTION, MAX_JITTER))
    return now + interval + jitter


def expires_at(arrival: float, lifetime: float) -> float:
    """The moment a message that arrived at ``arrival`` stops being retried."""
    return arrival + lifetime


def expired(arrival: float, now: float, lifetime: float) -> bool:
    """Whether a message has been queued for ``lifetime`` seconds or more."""
    return now >= arrival + lifetime


def delay_warning_due(
    arrival: float,
    now: float,
    warning_after: float | None,
    already_warned: bool,
) -> bool:
    """Whether the sender should now get the one "delayed" DSN (RFC 3464 Action: delayed).

    ``warning_after=None`` (config ``""``) disables warnings.
    """
    if warning_after is None or already_warned:
        return False
    return now >= arrival + warning_after


def delay_warning_time(arrival: float, warning_after: float | None, already_warned: bool) -> float | None:
    """When the delay warning becomes due, or None if none is owed."""
    if warning_after is None or already_warned:
        return None
    return arrival + warning_after


def entry_due(entry: QueueEntry, now: float, warning_after: float | None) -> float:
    """When the manager should next look at ``entry`` (used at scan time too).

    The earliest ``next_attempt`` of its unfinished recipients, the delay warning
    time if one is owed, or ``now`` if only a bounce or the removal is left.
    """
    times = [r.next_attempt for r in entry.recipients if not r.final]
    if entry.sender and any(r.status == FAILED and not r.notified for r in entry.recipients):
        times.append(now)
    if not times:
        return now  # done: remove it
    if entry.sender:
        warn = delay_warning_time(entry.arrival, warning_after, entry.delay_warned)
        if warn is not None and any(not r.final for r in entry.recipients):
            times.append(warn)
    return min(times)
