# -*- test-case-name: tests.queue.test_outcome -*-
"""What one delivery reply does to a recipient: status, retry time, expiry, history.

Pure (no clock, no I/O): the queue manager passes ``now`` and its ``rng``, so
the rules are table-tested (Postfix keeps the same rules in
``smtp_trouble.c``):

* 2xx: delivered.
* 5xx: failed for good (a DSN is owed).
* 4xx: deferred to the next retry interval, capped at the queue lifetime;
  once ``max_queue_lifetime`` has passed since arrival it fails instead
  (RFC 5321 section 4.5.4.1: give up after a few days).

``attempts`` counts attempts that reached an agent.  A remote recipient's
attempt is counted, and its ``next_attempt`` set, *before* connecting out
(the attempt mark, ``manager.QueueManager._begin``), so that a crash in the
middle never retries early; here only the lifetime cap is applied to it.  A
local delivery has no such window (it runs right after the commit, in our
own process), so a local recipient's failed attempt is counted here; a
delivered or bounced local recipient keeps the count it had, which is what
``queue show`` displays for a recipient that needed no retry.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from mailstack.delivery.replies import RemoteReply
from mailstack.errors import Reply
from mailstack.queue import schedule
from mailstack.queue.entry import DELIVERED, FAILED, RecipientState

MAX_HISTORY = 20  # attempts remembered per recipient for ``queue show``

SENT = "sent"
BOUNCED = "bounced"
DEFERRED = "deferred"


@dataclass(frozen=True)
class Outcome:
    """The log's view of one recorded reply."""

    status: str  # SENT, BOUNCED or DEFERRED
    expired: bool  # BOUNCED because the queue lifetime ran out
    host: str  # the MX that answered ("" for local delivery or no answer)
    ip: str


def record(
    rcpt: RecipientState,
    reply: Reply,
    now: float,
    arrival: float,
    intervals: Sequence[float],
    lifetime: float,
    rng: random.Random,
) -> Outcome:
    """Apply ``reply`` to ``rcpt`` (see the module docstring); returns what to log."""
    host = ip = ""
    if isinstance(reply, RemoteReply):
        host, ip = reply.host, reply.ip
    where = f"{host}[{ip}]" if ip else host
    rcpt.last_reply = str(reply)
    rcpt.last_host = where
    rcpt.history.append({"time": now, "host": where, "reply": rcpt.last_reply})
    del rcpt.history[:-MAX_HISTORY]
    if reply.code < 400:
        rcpt.status = DELIVERED
        return Outcome(SENT, False, host, ip)
    if reply.permanent:
        rcpt.status = FAILED
        return Outcome(BOUNCED, False, host, ip)
    if rcpt.local:
        rcpt.attempts += 1
        rcpt.next_attempt = schedule.next_attempt(rcpt.attempts, intervals, now, rng)
    if schedule.expired(arrival, now, lifetime):
        rcpt.status = FAILED
        return Outcome(BOUNCED, True, host, ip)
    rcpt.next_attempt = min(rcpt.next_attempt, max(now, schedule.expires_at(arrival, lifetime)))
    return Outcome(DEFERRED, False, host, ip)
