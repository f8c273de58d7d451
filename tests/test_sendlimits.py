"""Tests for mailstack.sendlimits, driven by task.Clock (no sleeps)."""

import json
import os

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack import sendlimits
from mailstack.auth.jsonfile import FileFormatError
from mailstack.errors import Reply

# A moment on a minute and hour boundary, so window arithmetic is easy to read.
T0 = 1_800_000_000 - 1_800_000_000 % 3600


class Blocking:
    """run_blocking stand-in: runs at once, or holds calls when ``hold`` is set."""

    def __init__(self):
        self.calls = []
        self.hold = False
        self.held = []

    def __call__(self, f, *args, **kwargs):
        self.calls.append(f)
        if self.hold:
            d = Deferred()
            self.held.append((d, f, args, kwargs))
            return d
        return maybeDeferred(f, *args, **kwargs)

    def release_all(self):
        held, self.held = self.held, []
        for d, f, args, kwargs in held:
            d.callback(f(*args, **kwargs))


class SendLimitsTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.clock = Clock()
        self.clock.advance(T0)
        self.blocking = Blocking()
        self.limits = self.make(per_hour=3, per_day=5)

    def make(self, per_hour, per_day):
        limits = sendlimits.SendLimits(self.clock, self.blocking, self.dir, per_hour, per_day)
        limits.startService()
        return limits

    def send(self, user="a@x", limits=None):
        token = self.successResultOf((limits or self.limits).reserve(user))
        self.assertIsInstance(token, sendlimits.Reservation)
        token.commit()

    def test_hourlyLimit(self):
        """The message after the hourly limit gets 451 4.7.1 naming that limit."""
        for _ in range(3):
            self.send()
        reply = self.successResultOf(self.limits.reserve("a@x"))
        self.assertEqual(reply, Reply(451, "4.7.1", "Hourly sending limit of 3 messages reached, try again later"))
        self.assertIsInstance(self.successResultOf(self.limits.reserve("b@x")), sendlimits.Reservation)

    def test_hourSlides(self):
        """A message stops counting for the hour 60 minutes after its minute began."""
        for _ in range(3):
            self.send()
        self.clock.advance(59 * 60 + 59)
        self.assertIsInstance(self.successResultOf(self.limits.reserve("a@x")), Reply)
        self.clock.advance(1)
        self.assertIsInstance(self.successResultOf(self.limits.reserve("a@x")), sendlimits.Reservation)

    def test_dailyLimit(self):
        """Across hours the daily limit applies, and lifts after 24 hours."""
        for _ in range(3):
            self.send()
        self.clock.advance(3600)
        for _ in range(2):
            self.send()
        reply = self.successResultOf(self.limits.reserve("a@x"))
        self.assertEqual(reply.enhanced, "4.7.1")
        self.assertIn("Daily sending limit of 5", reply.text)
        self.clock.advance(23 * 3600)  # the first three leave the day window
        self.assertIsInstance(self.successResultOf(self.limits.reserve("a@x")), sendlimits.Reservation)

    def test_reservationsCount(self):
        """Open reservations (concurrent sessions) count, so nobody overshoots."""
        tokens = [self.successResultOf(self.limits.reserve("a@x")) for _ in range(3)]
        self.assertIsInstance(self.successResultOf(self.limits.reserve("a@x")), Reply)
        tokens[0].release()
        self.assertIsInstance(self.successResultOf(self.limits.reserve("a@x")), sendlimits.Reservation)
        self.assertEqual(self.limits.usage("a@x").sent_last_hour, 0)

    def test_commitAndReleaseOnce(self):
        """commit counts once; release after commit and a second commit do nothing."""
        token = self.successResultOf(self.limits.reserve("a@x"))
        token.commit()
        token.commit()
        token.release()
        self.assertEqual(self.limits.usage("a@x"), sendlimits.Usage(1, 1, 3, 5))
        self.assertEqual(self.limits.held, {})

    def test_zeroMeansNoLimit(self):
        """Limits of 0 never refuse, but the counts are still kept."""
        limits = self.make(per_hour=0, per_day=0)
        for _ in range(50):
            self.send(limits=limits)
        self.assertEqual(limits.usage("a@x"), sendlimits.Usage(50, 50, 0, 0))

    def test_overrideSeenWithoutRestart(self):
        """An override written (as by the admin command) applies to the next MAIL."""
        for _ in range(3):
            self.send()
        sendlimits.LimitsFile(self.dir).set("a@x", per_hour=10)
        self.assertIsInstance(self.successResultOf(self.limits.reserve("a@x")), sendlimits.Reservation)
        self.assertEqual(self.limits.usage("a@x").limit_per_hour, 10)
        sendlimits.LimitsFile(self.dir).set("a@x", per_hour=None)
        self.assertEqual(self.limits.usage("a@x").limit_per_hour, 3)
        with open(os.path.join(self.dir, "limits.json")) as f:
            self.assertEqual(json.load(f), {"version": 1, "limits": {}})

    def test_batchedFlush(self):
        """Many messages make one write, FLUSH_DELAY after the first; none before."""
        for _ in range(3):
            self.send()
        self.assertEqual(self.blocking.calls, [])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "sendcounts.json")))
        self.clock.advance(sendlimits.FLUSH_DELAY)
        self.assertEqual(len(self.blocking.calls), 1)
        counts = sendlimits.read_counts(os.path.join(self.dir, "sendcounts.json"))
        self.assertEqual(counts["a@x"].last_hour(self.clock.seconds()), 3)
        self.clock.advance(60)
        self.assertEqual(len(self.blocking.calls), 1)  # nothing changed, nothing written

    def test_restartKeepsCounts(self):
        """Counts written before a stop are there after a restart."""
        for _ in range(3):
            self.send()
        self.limits.stopService()
        again = self.make(per_hour=3, per_day=5)
        self.assertIsInstance(self.successResultOf(again.reserve("a@x")), Reply)
        self.assertEqual(again.usage("a@x").sent_last_hour, 3)

    def test_crashLosesOnlyUnflushed(self):
        """After a crash (no stop) the counts of the last flush survive."""
        self.send()
        self.send()
        self.clock.advance(sendlimits.FLUSH_DELAY)
        self.send()  # not yet written when the process dies
        again = self.make(per_hour=3, per_day=5)
        self.assertEqual(again.usage("a@x").sent_last_hour, 2)

    def test_oneWriteAtATime(self):
        """A flush during a write waits for it, then writes the newer counts."""
        self.blocking.hold = True
        self.send()
        self.clock.advance(sendlimits.FLUSH_DELAY)
        self.send()
        stopped = self.limits.stopService()
        self.assertEqual(len(self.blocking.held), 1)
        self.blocking.release_all()
        self.assertEqual(len(self.blocking.held), 1)  # the second write, after the first
        self.blocking.release_all()
        self.successResultOf(stopped)
        counts = sendlimits.read_counts(os.path.join(self.dir, "sendcounts.json"))
        self.assertEqual(counts["a@x"].last_hour(self.clock.seconds()), 2)

    def test_writeFailureRetried(self):
        """A failed write is logged and the counts are written at the next try."""

        def broken(*a, **kw):
            raise OSError(28, "No space left on device")

        self.send()
        real = sendlimits.fsutil.write_atomic
        self.patch(sendlimits.fsutil, "write_atomic", broken)
        self.clock.advance(sendlimits.FLUSH_DELAY)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.patch(sendlimits.fsutil, "write_atomic", real)
        self.successResultOf(self.limits.stopService())
        counts = sendlimits.read_counts(os.path.join(self.dir, "sendcounts.json"))
        self.assertEqual(counts["a@x"].last_hour(self.clock.seconds()), 1)

    def test_oldCountersPruned(self):
        """Users whose messages left both windows disappear from the file."""
        self.send()
        self.clock.advance(25 * 3600)
        self.send("b@x")
        self.successResultOf(self.limits.stopService())
        counts = sendlimits.read_counts(os.path.join(self.dir, "sendcounts.json"))
        self.assertEqual(sorted(counts), ["b@x"])

    def test_brokenCountsFile(self):
        """A damaged counts file is one clear error at start, not a traceback later."""
        with open(os.path.join(self.dir, "sendcounts.json"), "w") as f:
            f.write('{"version": 1, "counts": {"a@x": {"m": {"x": 1}}}}')
        with self.assertRaises(FileFormatError) as e:
            self.make(3, 5)
        self.assertIn("sendcounts.json", str(e.exception))

    def test_usageReport(self):
        """The admin view reads the persisted counts and the effective limits."""
        for _ in range(2):
            self.send()
        self.clock.advance(3600)
        self.send()
        sendlimits.LimitsFile(self.dir).set("a@x", per_day=100)
        self.successResultOf(self.limits.stopService())
        report = sendlimits.usage_report(self.dir, ["a@x", "c@x"], 3, 5, self.clock.seconds())
        self.assertEqual(report["a@x"], sendlimits.Usage(1, 3, 3, 100))
        self.assertEqual(report["c@x"], sendlimits.Usage(0, 0, 3, 5))
