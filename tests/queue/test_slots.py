"""Outbound connection slots (``mailstack.queue.slots``): caps, order, shutdown."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue.slots import Slots


def fired(d: Deferred) -> list:
    """The result of ``d`` so far, as a list of at most one element."""
    out: list = []
    d.addCallback(out.append)
    return out


class SlotsTests(SynchronousTestCase):
    def test_free_slot_at_once(self) -> None:
        """Below both caps an acquire fires True at once."""
        slots = Slots(2, 2)
        self.assertEqual(fired(slots.acquire("a.test")), [True])
        self.assertEqual((slots.used, slots.by_domain), (1, {"a.test": 1}))

    def test_zero_means_unlimited(self) -> None:
        """0 for either cap means no limit."""
        slots = Slots(0, 0)
        results = [fired(slots.acquire("a.test")) for _ in range(500)]
        self.assertEqual(results, [[True]] * 500)

    def test_per_domain_cap_waits_then_serves_in_order(self) -> None:
        """At the per-domain cap a domain's acquires wait and are served in arrival order."""
        slots = Slots(10, 1)
        slots.acquire("a.test")
        first, second = fired(slots.acquire("a.test")), fired(slots.acquire("a.test"))
        self.assertEqual((first, second), ([], []))
        slots.release("a.test")
        self.assertEqual((first, second), ([True], []))
        slots.release("a.test")
        self.assertEqual(second, [True])
        self.assertEqual(slots.by_domain, {"a.test": 1})

    def test_other_domain_not_blocked_by_per_domain_cap(self) -> None:
        """A domain at its cap does not hold up another domain while the total allows."""
        slots = Slots(10, 1)
        slots.acquire("a.test")
        waiting = fired(slots.acquire("a.test"))
        self.assertEqual(fired(slots.acquire("b.test")), [True])
        self.assertEqual(waiting, [])

    def test_waiting_domain_queues_behind_its_waiters(self) -> None:
        """An acquire for a domain that has waiters waits behind them."""
        slots = Slots(2, 1)
        slots.acquire("a.test")
        early, late = fired(slots.acquire("a.test")), fired(slots.acquire("a.test"))
        slots.release("a.test")
        self.assertEqual((early, late), ([True], []))

    def test_total_cap_serves_earliest_fitting_waiter(self) -> None:
        """When the global cap frees a slot, the earliest waiter whose domain is below its
        own cap gets it, whatever its domain."""
        slots = Slots(2, 1)
        slots.acquire("a.test")
        slots.acquire("b.test")
        a2 = fired(slots.acquire("a.test"))  # waits: a.test at its cap (and the total)
        c1 = fired(slots.acquire("c.test"))  # waits: the total
        b2 = fired(slots.acquire("b.test"))  # waits: the total and b.test's cap
        slots.release("b.test")  # a.test is still at its cap: c.test is the earliest that fits
        self.assertEqual((a2, c1, b2), ([], [True], []))
        slots.release("a.test")
        self.assertEqual((a2, b2), ([True], []))
        slots.release("c.test")
        self.assertEqual(b2, [True])
        self.assertEqual((slots.used, slots.by_domain), (2, {"a.test": 1, "b.test": 1}))

    def test_granted_waiter_may_release_at_once(self) -> None:
        """A waiter that gives its slot back from its callback passes it on to the next."""
        slots = Slots(1, 0)
        slots.acquire("a.test")
        second = slots.acquire("a.test")
        second.addCallback(lambda _: slots.release("a.test"))
        third = fired(slots.acquire("a.test"))
        slots.release("a.test")
        self.assertEqual(third, [True])
        self.assertEqual((slots.used, slots.by_domain), (1, {"a.test": 1}))

    def test_cancel_all(self) -> None:
        """Shutdown: every waiter, of every domain, gets False."""
        slots = Slots(1, 1)
        slots.acquire("a.test")
        waiters = [fired(slots.acquire(d)) for d in ("a.test", "b.test", "a.test")]
        slots.cancel_all()
        self.assertEqual(waiters, [[False]] * 3)
        slots.release("a.test")
        self.assertEqual((slots.used, slots.by_domain), (0, {}))
