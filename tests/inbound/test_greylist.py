"""Greylist: triplets, delay, retention, bounds, and the batched table on disk (task.Clock)."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.inbound import greylist as greylistmod
from mailstack.inbound.greylist import DAY, Greylist, network
from mailstack.inbound.interfaces import IGreylist


class Pool:
    """A run_blocking that runs at once and records what it ran."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args, **kwargs):
        self.calls.append(f.__name__)
        try:
            return succeed(f(*args, **kwargs))
        except Exception as e:  # noqa: BLE001
            return fail(e)


class GreylistTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.pool = Pool()
        self.path = os.path.join(self.mktemp(), "greylist.json")

    def make(self, **kwargs):
        g = Greylist(self.path, self.clock, self.pool, delay=300, **kwargs)
        g.startService()
        self.addCleanup(lambda: g.running and g.stopService())
        return g

    def check(self, g, ip="192.0.2.10", sender="a@example.org", rcpt="b@example.net"):
        return self.successResultOf(g.check(ip, sender, rcpt))

    def test_provides_interface(self) -> None:
        """Greylist provides IGreylist."""
        self.assertTrue(verifyObject(IGreylist, Greylist(self.path, self.clock, self.pool, delay=300)))

    def test_network_of_client(self) -> None:
        """The triplet's client part is the /24 or the /64."""
        self.assertEqual(network("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(network("2001:db8:1:2:3::4"), "2001:db8:1:2::/64")
        self.assertEqual(network("::ffff:192.0.2.77"), "192.0.2.0/24")

    def test_delay(self) -> None:
        """First attempt deferred, a retry before the delay deferred, after it accepted."""
        g = self.make()
        self.assertFalse(self.check(g))
        self.clock.advance(299)
        self.assertFalse(self.check(g))
        self.clock.advance(1)
        self.assertTrue(self.check(g))

    def test_same_network_other_address(self) -> None:
        """A retry from another address of the same /24 counts; case of addresses is ignored."""
        g = self.make()
        self.assertFalse(self.check(g, ip="192.0.2.10"))
        self.clock.advance(300)
        self.assertTrue(self.check(g, ip="192.0.2.200", sender="A@Example.org"))
        self.assertFalse(self.check(g, ip="198.51.100.1"))

    def test_known_triplet_retained_30_days(self) -> None:
        """A passed triplet passes at once for 30 days after it was last seen, then is greylisted again."""
        g = self.make()
        self.check(g)
        self.clock.advance(300)
        self.assertTrue(self.check(g))
        self.clock.advance(29 * DAY)
        self.assertTrue(self.check(g))
        self.clock.advance(30 * DAY + 1)
        self.assertFalse(self.check(g))

    def test_pending_forgotten_after_retry_window(self) -> None:
        """A triplet that never came back within the retry window starts over."""
        g = self.make(retry_window=DAY)
        self.check(g)
        self.clock.advance(DAY + 1)
        self.assertFalse(self.check(g))

    def test_bounded_size_evicts_least_recently_seen(self) -> None:
        """Beyond max_entries the least recently seen triplet is dropped."""
        g = self.make(max_entries=2)
        self.check(g, rcpt="1@example.net")
        self.check(g, rcpt="2@example.net")
        self.check(g, rcpt="1@example.net")  # 1 is now the most recent
        self.check(g, rcpt="3@example.net")
        self.assertEqual(sorted(k[2] for k in g.entries), ["1@example.net", "3@example.net"])

    def test_writes_are_batched(self) -> None:
        """Many checks cause no write until the flush interval; an idle table is not rewritten."""
        g = self.make(flush_interval=30)
        for i in range(50):
            self.check(g, rcpt=f"{i}@example.net")
        self.assertNotIn("save_file", self.pool.calls)
        self.clock.advance(30)
        self.assertEqual(self.pool.calls.count("save_file"), 1)
        self.clock.advance(30)
        self.assertEqual(self.pool.calls.count("save_file"), 1)

    def test_survives_restart(self) -> None:
        """Stopping writes the table; a new Greylist on the same file knows the triplet."""
        g = self.make()
        self.check(g)
        self.clock.advance(300)
        self.assertTrue(self.check(g))
        self.successResultOf(g.stopService())
        self.assertTrue(os.path.exists(self.path))
        again = self.make()
        self.assertTrue(self.check(again))
        self.assertEqual(len(again.entries), 1)

    def test_pending_triplet_survives_restart(self) -> None:
        """A first attempt before a restart still counts for the retry after it."""
        g = self.make()
        self.assertFalse(self.check(g))
        self.clock.advance(30)  # the periodic flush
        g2 = Greylist(self.path, self.clock, self.pool, delay=300)
        g2.startService()
        self.clock.advance(300)
        self.assertTrue(self.check(g2))
        g2.stopService()

    def test_check_waits_for_load(self) -> None:
        """A check that arrives while the file is being read is answered once it is loaded."""
        pending = []

        def slow(f, *args):
            d = Deferred()
            pending.append((d, f, args))
            return d

        g = Greylist(self.path, self.clock, slow, delay=300)
        g.startService()
        d = g.check("192.0.2.1", "a@example.org", "b@example.net")
        self.assertNoResult(d)
        load, f, args = pending.pop(0)
        load.callback(f(*args))
        self.assertFalse(self.successResultOf(d))

    def test_unreadable_file_starts_empty(self) -> None:
        """A corrupt table is logged and the greylist starts empty instead of failing."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("{not json")
        g = self.make()
        self.assertFalse(self.check(g))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_write_failure_retried(self) -> None:
        """A failed write is logged and retried at the next interval."""
        g = self.make(flush_interval=30)
        self.check(g)
        real = greylistmod.fsutil.write_atomic
        self.patch(greylistmod.fsutil, "write_atomic", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
        self.clock.advance(30)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.patch(greylistmod.fsutil, "write_atomic", real)
        self.clock.advance(30)
        self.assertTrue(os.path.exists(self.path))
