"""queue/outcome.py: what one reply does to a recipient, as a table."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from mailstack.delivery.replies import RemoteReply
from mailstack.errors import Reply
from mailstack.queue import outcome
from mailstack.queue.entry import DELIVERED, FAILED, PENDING, RecipientState

ARRIVAL = 1_000_000.0
INTERVALS = (60.0, 300.0)
LIFETIME = 86400.0
OK = Reply(250, "2.0.0", "ok")
TEMP = Reply(451, "4.3.0", "later")
PERM = Reply(550, "5.1.1", "no")


def rcpt(local: bool, attempts: int = 1, next_attempt: float = ARRIVAL + 60) -> RecipientState:
    return RecipientState(address="a@x.test", original="a@x.test", local=local, attempts=attempts,
                          next_attempt=next_attempt)


class RecordTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Status, attempts, next_attempt and expiry for each kind of reply, local and remote."""
        now = ARRIVAL + 10
        late = ARRIVAL + LIFETIME + 1
        near_end = ARRIVAL + LIFETIME - 30  # the next retry would come after the lifetime
        # (local, reply, now, next_attempt before) -> (status, log status, expired, attempts, next_attempt)
        cases = [
            (False, OK, now, ARRIVAL + 60, DELIVERED, "sent", False, 1, ARRIVAL + 60),
            (True, OK, now, 0.0, DELIVERED, "sent", False, 1, 0.0),
            (False, PERM, now, ARRIVAL + 60, FAILED, "bounced", False, 1, ARRIVAL + 60),
            (True, PERM, now, 0.0, FAILED, "bounced", False, 1, 0.0),
            # remote: counted and scheduled before connecting; kept as is
            (False, TEMP, now, ARRIVAL + 60, PENDING, "deferred", False, 1, ARRIVAL + 60),
            # local: counted here and scheduled (see test_localDeferralUsesSchedule)
            (True, TEMP, now, 0.0, PENDING, "deferred", False, 2, None),
            # past the lifetime: fails, whatever it was
            (False, TEMP, late, ARRIVAL + 60, FAILED, "bounced", True, 1, ARRIVAL + 60),
            (True, TEMP, late, 0.0, FAILED, "bounced", True, 2, None),
            # near the end: the next attempt is capped at the expiry time
            (False, TEMP, near_end, near_end + 300, PENDING, "deferred", False, 1, ARRIVAL + LIFETIME),
        ]
        for local, reply, at, before, status, logged, expired, attempts, after in cases:
            r = rcpt(local, next_attempt=before)
            done = outcome.record(r, reply, at, ARRIVAL, INTERVALS, LIFETIME, random.Random(0))
            row = (local, str(reply), at)
            self.assertEqual(
                (r.status, done.status, done.expired, r.attempts), (status, logged, expired, attempts), row
            )
            if after is not None:
                self.assertEqual(r.next_attempt, after, row)
            self.assertEqual(r.last_reply, str(reply), row)

    def test_localDeferralUsesSchedule(self) -> None:
        """A local deferral's next attempt is the retry interval after now (plus jitter)."""
        r = rcpt(True, attempts=0, next_attempt=0.0)
        outcome.record(r, TEMP, ARRIVAL, ARRIVAL, INTERVALS, LIFETIME, random.Random(0))
        self.assertEqual(r.attempts, 1)
        self.assertGreaterEqual(r.next_attempt, ARRIVAL + 60)
        self.assertLess(r.next_attempt, ARRIVAL + 60 + 7)

    def test_remoteReplyNamesHost(self) -> None:
        """A RemoteReply's host and address go into last_host, the history and the outcome."""
        r = rcpt(False)
        done = outcome.record(r, RemoteReply(250, "2.0.0", "ok", host="mx.x.test", ip="192.0.2.1"),
                              ARRIVAL, ARRIVAL, INTERVALS, LIFETIME, random.Random(0))
        self.assertEqual((done.host, done.ip, r.last_host), ("mx.x.test", "192.0.2.1", "mx.x.test[192.0.2.1]"))
        self.assertEqual(r.history[-1], {"time": ARRIVAL, "host": "mx.x.test[192.0.2.1]", "reply": "250 2.0.0 ok"})

    def test_historyBounded(self) -> None:
        """Only the last MAX_HISTORY attempts are kept."""
        r = rcpt(False)
        for i in range(outcome.MAX_HISTORY + 5):
            outcome.record(r, TEMP, ARRIVAL + i, ARRIVAL, INTERVALS, LIFETIME, random.Random(0))
        self.assertEqual(len(r.history), outcome.MAX_HISTORY)
        self.assertEqual(r.history[0]["time"], ARRIVAL + 5)
