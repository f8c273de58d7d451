# -*- test-case-name: tests.queue.test_manager -*-
"""The start-up scan: ``(due, id)`` of committed entries, straight from the envelope files.

Blocking; the queue manager runs it in threads, one batch of ids per call.
It mirrors ``schedule.entry_due`` over the raw JSON instead of a
``QueueEntry``, because building entries for a large queue made start-up
slow; anything unusual falls back to ``store.load`` (which validates fully
and moves an unreadable envelope to ``corrupt/``), and a test holds the two
equal.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from mailstack.interfaces import IQueueStore
from mailstack.queue import schedule
from mailstack.queue.entry import DELIVERED, FAILED, FORMAT_VERSION, PENDING
from mailstack.queue.store import MESSAGE_KEY, NoSuchEntry


def due_from_json(data: Any, queue_id: str, now: float, warning_after: float | None) -> float | None:
    """``schedule.entry_due`` straight from a parsed envelope, without building a QueueEntry.

    None when anything looks unusual (wrong version, id or types): the caller
    then goes through ``store.load``.
    """
    if type(data) is not dict or data.get("version") != FORMAT_VERSION or data.get("id") != queue_id:
        return None
    held = data.get("held_since", 0.0)
    if type(held) not in (int, float):
        return None
    if held > 0:
        return math.inf  # held: not scheduled (``queue/hold.py``)
    sender = data.get("sender")
    recipients = data.get("recipients")
    if type(sender) is not str or type(recipients) is not list or not recipients:
        return None
    times: list[float] = []
    owed_bounce = False
    pending = False
    for r in recipients:
        if type(r) is not dict:
            return None
        status = r.get("status")
        if status == PENDING:
            t = r.get("next_attempt")
            if not isinstance(t, (int, float)) or isinstance(t, bool):
                return None
            times.append(t)
            pending = True
        elif status == FAILED:
            if type(r.get("notified")) is not bool:
                return None
            owed_bounce |= not r["notified"]
        elif status != DELIVERED:
            return None
    if sender and owed_bounce:
        times.append(now)
    if not times:
        return now
    if sender and pending:
        arrival = data.get("arrival")
        warned = data.get("delay_warned")
        if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or type(warned) is not bool:
            return None
        warn = schedule.delay_warning_time(arrival, warning_after, warned)
        if warn is not None:
            times.append(warn)
    return min(times)


def scan_schedule(
    store: IQueueStore, ids: list[str], now: float, warning_after: float | None
) -> list[tuple[float, str]]:
    """``(due, id)`` of the entries ``ids`` (blocking; one batch of the start-up scan);
    ``due`` is ``math.inf`` for a held entry.

    Reads each envelope once and takes only what the schedule needs; an entry
    removed meanwhile is skipped, an unusual one (or one whose message is
    neither inside the envelope nor in ``msg/``) goes through ``store.load``.
    An entry tried when the last process stopped is not due before its
    attempt mark.
    """
    out: list[tuple[float, str]] = []
    loads = json.loads
    exists = os.path.exists
    for qid in ids:
        due = None
        mark = 0.0
        try:
            data, mark = store.read_envelope(qid)
            parsed = loads(data.decode("utf-8"))
            # No message inside and none in msg/: store.load moves the envelope aside.
            if MESSAGE_KEY in parsed or exists(store.message_path(qid)):
                due = due_from_json(parsed, qid, now, warning_after)
        except NoSuchEntry:
            continue  # delivered or deleted since the listing
        except Exception:  # unreadable: store.load below decides (and moves it aside)
            due = None
        if due is None:
            try:
                entry = store.load(qid)
                due = math.inf if entry.held else schedule.entry_due(entry, now, warning_after)
            except KeyError:  # NoSuchEntry / CorruptEntry: gone or moved aside
                continue
        out.append((max(due, mark), qid))
    return out
