"""Retry timing: pure table tests, no clock."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue import schedule

INTERVALS = (60.0, 300.0, 3600.0)


class ScheduleTests(SynchronousTestCase):
    def test_intervals(self) -> None:
        """The n-th attempt waits the n-th interval; the last one repeats."""
        table = [(0, 60), (1, 60), (2, 300), (3, 3600), (4, 3600), (50, 3600)]
        for attempts, wait in table:
            self.assertEqual(schedule.next_attempt(attempts, INTERVALS, 1000.0), 1000.0 + wait, attempts)

    def test_jitterSmallAndPositive(self) -> None:
        """Jitter is within [0, min(10%, 300 s)] and depends on the rng only."""
        rng = random.Random(7)
        for attempts, wait in [(1, 60), (2, 300), (3, 3600)]:
            for _ in range(50):
                t = schedule.next_attempt(attempts, INTERVALS, 0.0, rng)
                self.assertGreaterEqual(t, wait)
                self.assertLessEqual(t, wait + min(wait * 0.1, 300))
        a = schedule.next_attempt(1, INTERVALS, 0.0, random.Random(1))
        self.assertEqual(a, schedule.next_attempt(1, INTERVALS, 0.0, random.Random(1)))

    def test_expired(self) -> None:
        """Expired once the lifetime has passed since arrival."""
        self.assertFalse(schedule.expired(100.0, 199.0, 100.0))
        self.assertTrue(schedule.expired(100.0, 200.0, 100.0))
        self.assertEqual(schedule.expires_at(100.0, 50.0), 150.0)

    def test_delayWarning(self) -> None:
        """The delay warning is due once, after the configured time; None disables it."""
        self.assertFalse(schedule.delay_warning_due(0.0, 3599.0, 3600.0, False))
        self.assertTrue(schedule.delay_warning_due(0.0, 3600.0, 3600.0, False))
        self.assertFalse(schedule.delay_warning_due(0.0, 9999.0, 3600.0, True))
        self.assertFalse(schedule.delay_warning_due(0.0, 9999.0, None, False))
        self.assertEqual(schedule.delay_warning_time(10.0, 5.0, False), 15.0)
        self.assertIsNone(schedule.delay_warning_time(10.0, 5.0, True))
