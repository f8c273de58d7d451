# -*- test-case-name: tests.queue.test_queuecmd -*-
"""``mailstack queue list|show|flush|delete|hold|release``: the outbound queue from the shell.

Works beside a running server: it reads the envelopes the server writes
(``queue/store.py``), ``flush`` creates the trigger file the manager polls
about once a second, and ``delete`` removes an entry under its entry lock (a
``flock`` on the message file, ``queue.locks.entry_lock``), the lock the manager
holds while saving, so a deleted entry is never written back.  ``hold`` and
``release`` (``queue/hold.py``) change the envelope under the same lock.

Handlers follow ``admin/cli.py``: ``handler(config, args) -> exit status``,
output to ``args.stdout``, ``Refused`` for a refused request (exit 1).
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from typing import Any

from mailstack.interfaces import IQueueStore
from mailstack.logsafe import escape
from mailstack.queue import hold
from mailstack.queue.entry import DELIVERED, FAILED, QueueEntry, well_formed
from mailstack.queue.locks import remove_entry
from mailstack.queue.store import MESSAGE_KEY, NoSuchEntry, QueueStore

FINAL = (DELIVERED, FAILED)


def _refused(message: str) -> Exception:
    from mailstack.admin.cli import Refused

    return Refused(message)


def store_of(config: Any) -> QueueStore:
    return QueueStore(os.path.join(config.data_dir, "queue"))


_ISO_CACHE: dict[int, str] = {}


def _iso(t: float) -> str:
    """UTC ISO 8601 to the second; cached per second (a listing repeats seconds a lot)."""
    if not t:
        return ""
    key = int(t)
    text = _ISO_CACHE.get(key)
    if text is None:
        if len(_ISO_CACHE) > 100_000:
            _ISO_CACHE.clear()
        text = datetime.fromtimestamp(key, UTC).isoformat().replace("+00:00", "Z")
        _ISO_CACHE[key] = text
    return text


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def summary(entry: QueueEntry, now: float) -> dict[str, Any]:
    """The ``queue list --json`` row of one entry."""
    return _summary(entry.to_json(), now)


def _summary(data: dict[str, Any], now: float) -> dict[str, Any]:
    """``summary`` from the envelope's JSON form (a dict that ``entry.well_formed`` accepted)."""
    recipients = data["recipients"]
    pending = [r for r in recipients if r["status"] not in FINAL]
    errors = [r["last_reply"] for r in recipients if r["last_reply"] and r["status"] != DELIVERED]
    return {
        "id": data["id"],
        "arrival": _iso(data["arrival"]),
        "age": int(max(0.0, now - data["arrival"])),
        "sender": data["sender"],
        "size": data["size"],
        "recipients": [
            {
                "address": r["address"],
                "status": r["status"],
                "attempts": r["attempts"],
                "next_attempt": _iso(r["next_attempt"]) if r["status"] not in FINAL else "",
                "last_reply": r["last_reply"],
                "last_host": r["last_host"],
            }
            for r in recipients
        ],
        "attempts": max((r["attempts"] for r in recipients), default=0),
        "next_attempt": _iso(min(r["next_attempt"] for r in pending)) if pending else "",
        "last_error": errors[-1] if errors else "",
        "held": bool(data.get("held_since", 0)),
    }


def _envelopes(store: IQueueStore) -> list[dict[str, Any]]:
    """Every entry's envelope as a checked dict, oldest first (blocking).

    Each envelope is read and parsed once; anything unusual goes through
    ``store.load``, which moves an unreadable envelope to ``corrupt/`` (as
    ``scan()`` does).  An entry removed while we read is skipped.
    """
    out = []
    loads = json.loads
    for queue_id in store.ids():
        try:
            raw, _ = store.read_envelope(queue_id)
        except NoSuchEntry:
            continue
        except OSError:
            raw = b""
        try:
            data = loads(raw.decode("utf-8"))
            data.pop(MESSAGE_KEY, None)  # a message stored inside its envelope is not listed
            ok = well_formed(data, queue_id)
        except Exception:
            ok = False
        if not ok:
            try:
                data = store.load(queue_id).to_json()
            except KeyError:  # gone meanwhile, or unreadable and moved aside
                continue
        out.append(data)
    out.sort(key=lambda d: (d["arrival"], d["id"]))
    return out


def queue_list(config: Any, args: Any) -> int:
    now = time.time()
    envelopes = _envelopes(store_of(config))
    out = args.stdout
    if args.json:
        # A JSON array with one compact row per line: json.dumps with indent
        # runs the pure-Python encoder, several times slower on a large queue.
        if not envelopes:
            out.write("[]\n")
            return 0
        dumps = json.dumps
        out.write("[\n")
        for i in range(0, len(envelopes), 5000):
            chunk = ",\n".join(dumps(_summary(d, now)) for d in envelopes[i : i + 5000])
            out.write(chunk + (",\n" if i + 5000 < len(envelopes) else "\n"))
        out.write("]\n")
        return 0
    if not envelopes:
        print("queue is empty", file=out)
        return 0
    lines: list[str] = []
    for d in envelopes:
        recipients = d["recipients"]
        pending = [r["next_attempt"] for r in recipients if r["status"] not in FINAL]
        attempts = max((r["attempts"] for r in recipients), default=0)
        lines.append(
            f"{d['id']}  {_age(now - d['arrival']):>4}  {d['size']:>8}  <{escape(d['sender'])}>"
            f"  attempts={attempts}  next={_iso(min(pending)) if pending else '-'}"
            + ("  HELD" if d.get("held_since", 0) else "")
        )
        for r in recipients:
            line = f"    {r['status']:<9} <{escape(r['address'])}>"
            if r["last_reply"]:
                line += f"  ({escape(r['last_host']) + ': ' if r['last_host'] else ''}{escape(r['last_reply'])})"
            lines.append(line)
        if len(lines) >= 10_000:
            out.write("\n".join(lines) + "\n")
            lines = []
    lines.append(f"{len(envelopes)} message(s) in the queue")
    out.write("\n".join(lines) + "\n")
    return 0


def _load(store: Any, queue_id: str) -> QueueEntry:
    try:
        return store.load(queue_id)
    except KeyError:
        raise _refused(f"{queue_id}: no such queue entry") from None


def queue_show(config: Any, args: Any) -> int:
    store = store_of(config)
    entry = _load(store, args.id)
    out = args.stdout
    row = summary(entry, time.time())
    if getattr(args, "json", False):
        data = entry.to_json()
        data["headers"] = store.message_headers(entry.id).decode("utf-8", "replace")
        print(json.dumps(data, indent=2), file=out)
        return 0
    print(f"id:        {entry.id}", file=out)
    print(f"arrival:   {row['arrival']} ({_age(row['age'])} ago)", file=out)
    print(f"sender:    <{escape(entry.sender)}>", file=out)
    print(f"size:      {entry.size}", file=out)
    if entry.user:
        print(f"user:      {escape(entry.user)}", file=out)
    if entry.peer:
        print(f"peer:      {escape(entry.peer)}", file=out)
    print(f"delay DSN: {'sent' if entry.delay_warned else 'no'}", file=out)
    if entry.ret or entry.envid:
        print(f"DSN:       RET={entry.ret or '-'} ENVID={escape(entry.envid) or '-'}", file=out)
    if entry.smtputf8:
        print("SMTPUTF8:  yes", file=out)
    if entry.held:
        print(f"held:      since {_iso(entry.held_since)} (not tried until released)", file=out)
    for r in entry.recipients:
        was = f" (was <{escape(r.original)}>)" if r.original != r.address else ""
        print(f"recipient: <{escape(r.address)}>{was}", file=out)
        print(f"    status {r.status}, {'local' if r.local else 'remote'}, attempts {r.attempts}", file=out)
        if r.notify or r.orcpt:
            print(f"    NOTIFY={','.join(r.notify) or '-'} ORCPT={escape(r.orcpt) or '-'}", file=out)
        if not r.final:
            print(f"    next attempt {_iso(r.next_attempt) or 'now'}", file=out)
        for h in r.history:
            print(f"    {_iso(h.get('time', 0))}  {escape(h.get('host', ''))}  {escape(h.get('reply', ''))}", file=out)
    print("headers:", file=out)
    headers = store.message_headers(entry.id).decode("utf-8", "replace")
    for line in headers.rstrip("\r\n").split("\n"):  # only LF ends a line; a stray CR is shown
        print(f"    {escape(line.removesuffix(chr(13)))}", file=out)
    return 0


def queue_flush(config: Any, args: Any) -> int:
    store_of(config).request_flush()
    print("flush requested: a running server retries every queued message now", file=args.stdout)
    return 0


def queue_delete(config: Any, args: Any) -> int:
    store = store_of(config)
    _load(store, args.id)
    if not remove_entry(store, args.id):
        raise _refused(f"{args.id}: no such queue entry")
    store.request_kick(args.id)  # a held entry leaves the running manager's count
    print(f"deleted {args.id}", file=args.stdout)
    return 0


def _hold_or_release(config: Any, args: Any, change: Any, verb: str, past: str, unchanged: str) -> int:
    store = store_of(config)
    if args.all == bool(args.id):
        raise _refused(f"queue {verb}: give one ID or --all")
    ids = store.ids() if args.all else [args.id]
    now = time.time()
    changed = 0
    for queue_id in ids:
        try:
            done = change(store, queue_id, now)
        except KeyError:  # NoSuchEntry: delivered or deleted meanwhile
            if not args.all:
                raise _refused(f"{queue_id}: no such queue entry") from None
            continue
        changed += done
        if not args.all:
            print(f"{past} {queue_id}" if done else f"{queue_id}: {unchanged}", file=args.stdout)
    if args.all:
        print(f"{past} {changed} entr{'y' if changed == 1 else 'ies'}", file=args.stdout)
    return 0


def queue_hold(config: Any, args: Any) -> int:
    return _hold_or_release(config, args, hold.hold, "hold", "held", "already held")


def queue_release(config: Any, args: Any) -> int:
    return _hold_or_release(config, args, hold.release, "release", "released", "not held")


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
    for name, func, text in (
        ("hold", queue_hold, "keep entries from being tried until released (expiry paused)"),
        ("release", queue_release, "release held entries: they are tried now"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("id", metavar="ID", nargs="?", default="")
        p.add_argument("--all", action="store_true", help="every entry in the queue")
        p.set_defaults(func=func)
    return queue
