# -*- test-case-name: tests.queue.test_queuecmd -*-
"""``mailstack queue list|show|flush|delete``: the outbound queue from the shell.

Works beside a running server: it reads the envelopes the server writes
(``queue/store.py``), ``flush`` creates the trigger file the manager polls
about once a second, and ``delete`` removes an entry under ``queue/lock``, the
lock the manager holds while saving, so a deleted entry is never written back
(``queue/manager.py``).

Handlers follow ``admin/cli.py``: ``handler(config, args) -> exit status``,
output to ``args.stdout``, ``Refused`` for a refused request (exit 1).
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

from mailstack.queue.entry import QueueEntry


def _refused(message: str) -> Exception:
    from mailstack.admin.cli import Refused

    return Refused(message)


def store_of(config: Any) -> Any:
    from mailstack.queue.store import QueueStore

    return QueueStore(os.path.join(config.data_dir, "queue"))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else ""


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def summary(entry: QueueEntry, now: float) -> dict[str, Any]:
    """The ``queue list --json`` row of one entry."""
    pending = [r for r in entry.recipients if not r.final]
    errors = [r.last_reply for r in entry.recipients if r.last_reply and r.status != "delivered"]
    return {
        "id": entry.id,
        "arrival": _iso(entry.arrival),
        "age": int(max(0.0, now - entry.arrival)),
        "sender": entry.sender,
        "size": entry.size,
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "attempts": r.attempts,
                "next_attempt": _iso(r.next_attempt) if not r.final else "",
                "last_reply": r.last_reply,
                "last_host": r.last_host,
            }
            for r in entry.recipients
        ],
        "attempts": max((r.attempts for r in entry.recipients), default=0),
        "next_attempt": _iso(min(r.next_attempt for r in pending)) if pending else "",
        "last_error": errors[-1] if errors else "",
    }


def _entries(store: Any) -> list[QueueEntry]:
    if not os.path.isdir(store.root):
        return []
    return sorted(store.scan(), key=lambda e: (e.arrival, e.id))


def queue_list(config: Any, args: Any) -> int:
    now = time.time()
    rows = [summary(e, now) for e in _entries(store_of(config))]
    out = args.stdout
    if args.json:
        print(json.dumps(rows, indent=2), file=out)
        return 0
    if not rows:
        print("queue is empty", file=out)
        return 0
    for row in rows:
        print(
            f"{row['id']}  {_age(row['age']):>4}  {row['size']:>8}  <{row['sender']}>"
            f"  attempts={row['attempts']}  next={row['next_attempt'] or '-'}",
            file=out,
        )
        for r in row["recipients"]:
            line = f"    {r['status']:<9} <{r['address']}>"
            if r["last_reply"]:
                line += f"  ({r['last_host'] + ': ' if r['last_host'] else ''}{r['last_reply']})"
            print(line, file=out)
    print(f"{len(rows)} message(s) in the queue", file=out)
    return 0


def _load(store: Any, queue_id: str) -> QueueEntry:
    try:
        return store.load(queue_id)
    except KeyError:
        raise _refused(f"{queue_id}: no such queue entry") from None


def queue_show(config: Any, args: Any) -> int:
    from mailstack.queue.manager import read_headers

    store = store_of(config)
    entry = _load(store, args.id)
    out = args.stdout
    row = summary(entry, time.time())
    if getattr(args, "json", False):
        data = entry.to_json()
        data["headers"] = read_headers(store.message_path(entry.id)).decode("utf-8", "replace")
        print(json.dumps(data, indent=2), file=out)
        return 0
    print(f"id:        {entry.id}", file=out)
    print(f"arrival:   {row['arrival']} ({_age(row['age'])} ago)", file=out)
    print(f"sender:    <{entry.sender}>", file=out)
    print(f"size:      {entry.size}", file=out)
    if entry.user:
        print(f"user:      {entry.user}", file=out)
    if entry.peer:
        print(f"peer:      {entry.peer}", file=out)
    print(f"delay DSN: {'sent' if entry.delay_warned else 'no'}", file=out)
    for r in entry.recipients:
        print(f"recipient: <{r.address}>" + (f" (was <{r.original}>)" if r.original != r.address else ""), file=out)
        print(f"    status {r.status}, {'local' if r.local else 'remote'}, attempts {r.attempts}", file=out)
        if not r.final:
            print(f"    next attempt {_iso(r.next_attempt) or 'now'}", file=out)
        for h in r.history:
            print(f"    {_iso(h.get('time', 0))}  {h.get('host', '')}  {h.get('reply', '')}", file=out)
    print("headers:", file=out)
    headers = read_headers(store.message_path(entry.id)).decode("utf-8", "replace")
    for line in headers.splitlines():
        print(f"    {line}", file=out)
    return 0


def queue_flush(config: Any, args: Any) -> int:
    store_of(config).request_flush()
    print("flush requested: a running server retries every queued message now", file=args.stdout)
    return 0


def queue_delete(config: Any, args: Any) -> int:
    from mailstack.queue.manager import remove_entry

    store = store_of(config)
    _load(store, args.id)
    if not remove_entry(store, args.id):
        raise _refused(f"{args.id}: no such queue entry")
    print(f"deleted {args.id}", file=args.stdout)
    return 0


def add_parser(subparsers: Any) -> Any:
    """Register ``queue`` and its subcommands on the top-level ``subparsers``."""
    queue = subparsers.add_parser("queue", help="inspect and manage the outbound queue")
    commands = queue.add_subparsers(dest="queue_command", metavar="COMMAND")
    commands.required = True
    p = commands.add_parser("list", help="id, age, sender, recipients, attempts, next try, last error")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=queue_list)
    p = commands.add_parser("show", help="one entry: envelope, per-recipient history, headers")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=queue_show)
    p = commands.add_parser("flush", help="a running server retries everything now")
    p.set_defaults(func=queue_flush)
    p = commands.add_parser("delete", help="remove one entry (safe while the server runs)")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=queue_delete)
    return queue
