# -*- test-case-name: tests.queue.test_hold -*-
"""``mailstack queue hold|release``: keep entries from being tried until released.

A hold is part of the envelope (``QueueEntry.held_since``), written with the
store's locked save, so it survives restarts and a running manager sees it
at the entry's next round: it then keeps the entry aside (``queue list``
still shows it, ``queue flush`` does not try it).  An attempt already under
way when the hold is written finishes.

The queue lifetime (``relay.max_queue_lifetime``) does not run while an
entry is held: ``release`` adds the time held to ``held_time``, which moves
the entry's expiry (``QueueEntry.expiry_base``) by as much.  Released
recipients are due at once, and the running manager is told through a kick
request (``store.request_kick``), which it polls like ``queue flush``.

Blocking (file I/O and locks): the admin command calls these directly.
"""

from __future__ import annotations

from mailstack.interfaces import IQueueStore
from mailstack.queue.locks import entry_lock
from mailstack.queue.store import NoSuchEntry


def hold(store: IQueueStore, queue_id: str, now: float) -> bool:
    """Hold one entry; False if it was held already.  NoSuchEntry if it is gone."""
    with entry_lock(store, queue_id) as present:
        if not present:
            raise NoSuchEntry(queue_id)
        entry = store.load(queue_id)
        if entry.held:
            return False
        entry.held_since = max(now, 1e-6)  # 0 means "not held"
        store.save(entry)
        return True


def release(store: IQueueStore, queue_id: str, now: float) -> bool:
    """Release one entry (due now); False if it was not held.  NoSuchEntry if it is gone."""
    with entry_lock(store, queue_id) as present:
        if not present:
            raise NoSuchEntry(queue_id)
        entry = store.load(queue_id)
        if not entry.held:
            return False
        entry.held_time += max(0.0, now - entry.held_since)
        entry.held_since = 0.0
        for r in entry.recipients:
            if not r.final:
                r.next_attempt = min(r.next_attempt, now)
        store.save(entry)
    store.request_kick(queue_id)
    return True
