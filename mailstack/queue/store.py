# -*- test-case-name: tests.queue.test_store -*-
"""The durable queue on disk: format, commit protocol, scan and crash recovery.

Blocking and free of Twisted imports, so that the admin command can use it on
the same directory while the server runs; the server calls it in threads.

Layout under ``root`` (``data_dir/queue``)
------------------------------------------
``tmp/<id>``
    A message being received.  Not committed; emptied by ``recover()``.
``msg/<id>``
    The message bytes (Received: header first), immutable once committed.
``env/<id>.json``
    The envelope: UTF-8 JSON of ``QueueEntry.to_json()`` (``version``, ``id``,
    ``sender``, ``arrival``, ``size``, ``user``, ``peer``, ``delay_warned`` and per
    recipient ``address``, ``original``, ``local``, ``status``, ``attempts``,
    ``next_attempt``, ``last_reply``, ``last_host``, ``notified``, ``history``).
    Always replaced whole with ``fsutil.write_atomic`` (temporary names start
    with ``.tmp.`` and are ignored by ``scan()``).  **The envelope file is the
    commit record**, like Postfix's END record: a message exists for the queue
    exactly when its envelope does.
``corrupt/``
    Unreadable envelopes (and their message, if any) and envelopes whose
    message is missing are moved here for inspection, never deleted.
``flush``
    The trigger file: the admin command creates it, the running manager
    consumes it with ``flush_requested()`` and retries everything at once.

IDs are ``<14 hex digits of Unix microseconds><10 random hex digits>``: they
sort by arrival and are unique across processes without coordination.

Commit protocol (``commit``)
----------------------------
1. fsync ``tmp/<id>`` (the bytes are on disk);
2. rename it to ``msg/<id>`` and fsync ``msg/``;
3. write ``env/<id>.json`` (tmp, fsync, rename) and fsync ``env/``.

The ``msg/`` fsync comes before the envelope exists so that a crash can never
leave a durable envelope whose message rename was lost.  A crash before step 3
completes leaves a message without an envelope: it was never acknowledged, and
``recover()`` deletes it.  Each commit touches only its own files and holds no
lock, so many commits from a thread pool run their fsyncs in parallel (the
file system batches them into shared journal commits).

``remove`` deletes the envelope first (durably) and then the message; a crash
between the two leaves an orphan message that ``recover()`` deletes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import IO, Iterator

from mailstack.queue.entry import QueueEntry
from mailstack.storage import fsutil

TMP = "tmp"
MSG = "msg"
ENV = "env"
CORRUPT = "corrupt"
FLUSH = "flush"
CHUNK = 64 * 1024  # write buffer of a message being received

_ID = re.compile(r"[0-9a-f]{24}\Z")
_ENV_SUFFIX = ".json"


class NoSuchEntry(KeyError):
    """No envelope with that id (never was, already removed, or a bad id)."""


class CorruptEntry(NoSuchEntry):
    """The envelope could not be read; it has been moved to ``corrupt/``."""


@dataclass(frozen=True)
class Recovery:
    """What ``recover()`` cleaned up, for the caller to log."""

    tmp_removed: int = 0  # messages being received when the process died
    orphans_removed: int = 0  # committed bytes with no envelope: never acknowledged
    corrupt: tuple[str, ...] = ()  # ids moved to corrupt/


class QueueStore:
    """The queue directory ``root``; every method blocks."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._dirs = {name: os.path.join(self.root, name) for name in (TMP, MSG, ENV, CORRUPT)}

    # -- names --------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        """A fresh id: sortable by time, unique across processes (40 random bits)."""
        return f"{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"

    def tmp_path(self, queue_id: str) -> str:
        return os.path.join(self._dirs[TMP], _checked(queue_id))

    def message_path(self, queue_id: str) -> str:
        return os.path.join(self._dirs[MSG], _checked(queue_id))

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self._dirs[ENV], _checked(queue_id) + _ENV_SUFFIX)

    # -- writing ------------------------------------------------------------

    def open_tmp(self, queue_id: str) -> IO[bytes]:
        """Create ``tmp/<id>`` exclusively and return it open for buffered writes.

        The writes only reach the page cache; ``commit`` makes them durable.
        """
        fsutil.ensure_dir(self._dirs[TMP])
        fd = fsutil._open(self.tmp_path(queue_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "wb", buffering=CHUNK)

    def commit(self, entry: QueueEntry) -> None:
        """Make ``tmp/<entry.id>`` a queued message (protocol in the module doc).

        On any failure everything of this id is removed again and the error is
        raised: the message was not accepted and nothing half-written remains.
        """
        msg_path = self.message_path(entry.id)
        try:
            fsutil.ensure_dir(self._dirs[MSG])
            fsutil.ensure_dir(self._dirs[ENV])
            _fsync_file(self.tmp_path(entry.id))
            fsutil._rename(self.tmp_path(entry.id), msg_path)
            fsutil.fsync_dir(self._dirs[MSG])
            fsutil.write_atomic(self.envelope_path(entry.id), _encode(entry))
        except BaseException:
            # Envelope first: once it is gone the message is an orphan either way.
            for path in (self.envelope_path(entry.id), msg_path, self.tmp_path(entry.id)):
                try:
                    fsutil._unlink(path)
                except OSError:
                    pass
            raise

    def save(self, entry: QueueEntry) -> None:
        """Durably replace the envelope of a committed entry (new attempt state)."""
        fsutil.write_atomic(self.envelope_path(entry.id), _encode(entry))

    def remove(self, queue_id: str) -> bool:
        """Drop an entry: envelope first (durably), then the message.

        False if there was no envelope.  The message unlink is not fsynced: if
        a crash undoes it, ``recover()`` deletes the orphan.
        """
        gone = fsutil.unlink_durable(self.envelope_path(queue_id))
        fsutil.unlink_durable(self.message_path(queue_id), sync_dir=False)
        return gone

    # -- reading ------------------------------------------------------------

    def load(self, queue_id: str) -> QueueEntry:
        """The entry ``queue_id``; NoSuchEntry, or CorruptEntry after moving it aside."""
        if not _ID.match(queue_id):
            raise NoSuchEntry(queue_id)
        try:
            with open(self.envelope_path(queue_id), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise NoSuchEntry(queue_id) from None
        try:
            return _decode(queue_id, data)
        except ValueError:
            self._move_to_corrupt(queue_id)
            raise CorruptEntry(queue_id) from None

    def ids(self) -> list[str]:
        """Ids of all committed entries, oldest first.  Reads directory names only."""
        try:
            names = os.listdir(self._dirs[ENV])
        except FileNotFoundError:
            return []
        ids = (n[: -len(_ENV_SUFFIX)] for n in names if n.endswith(_ENV_SUFFIX))
        return sorted(i for i in ids if _ID.match(i))

    def scan(self) -> Iterator[QueueEntry]:
        """Every committed entry, oldest first, reading envelopes only.

        Unreadable envelopes are moved to ``corrupt/`` and skipped; an entry
        removed while we scan (by the manager or the admin command) is skipped.
        """
        for queue_id in self.ids():
            try:
                yield self.load(queue_id)
            except NoSuchEntry:
                continue

    # -- start-up -----------------------------------------------------------

    def recover(self) -> Recovery:
        """Bring the directory to a consistent state after a crash.

        Call once at start, before any mail is accepted: it empties ``tmp/``,
        removes stale envelope temporaries, deletes messages without an envelope
        (their commit never finished, so they were never acknowledged) and moves
        envelopes without a message, or unreadable ones, to ``corrupt/``.
        """
        for path in self._dirs.values():
            fsutil.ensure_dir(path)
        tmp_removed = 0
        for name in os.listdir(self._dirs[TMP]):
            if fsutil.unlink_durable(os.path.join(self._dirs[TMP], name), sync_dir=False):
                tmp_removed += 1
        for name in os.listdir(self._dirs[ENV]):
            if name.startswith(".tmp."):
                fsutil.unlink_durable(os.path.join(self._dirs[ENV], name), sync_dir=False)

        envelopes = set(self.ids())
        orphans_removed = 0
        for name in os.listdir(self._dirs[MSG]):
            if name not in envelopes:
                fsutil.unlink_durable(os.path.join(self._dirs[MSG], name), sync_dir=False)
                orphans_removed += 1

        corrupt = []
        for queue_id in sorted(envelopes):
            try:
                self.load(queue_id)
            except CorruptEntry:
                corrupt.append(queue_id)
                continue
            if not os.path.exists(self.message_path(queue_id)):
                self._move_to_corrupt(queue_id)
                corrupt.append(queue_id)
        for name in (TMP, MSG, ENV):
            fsutil.fsync_dir(self._dirs[name])
        return Recovery(tmp_removed, orphans_removed, tuple(corrupt))

    def _move_to_corrupt(self, queue_id: str) -> None:
        """Move the envelope (and message, if any) of ``queue_id`` to ``corrupt/``."""
        fsutil.ensure_dir(self._dirs[CORRUPT])
        moves = [
            (self.envelope_path(queue_id), os.path.join(self._dirs[CORRUPT], queue_id + _ENV_SUFFIX)),
            (self.message_path(queue_id), os.path.join(self._dirs[CORRUPT], queue_id)),
        ]
        for src, dst in moves:
            try:
                fsutil._rename(src, dst)
            except FileNotFoundError:
                pass
        fsutil.fsync_dir(self._dirs[CORRUPT])
        fsutil.fsync_dir(self._dirs[ENV])

    # -- flush trigger ------------------------------------------------------

    def request_flush(self) -> None:
        """Ask the running manager to retry everything now (admin ``queue flush``)."""
        fsutil.ensure_dir(self.root)
        fsutil.write_atomic(os.path.join(self.root, FLUSH), b"")

    def flush_requested(self) -> bool:
        """True once per request: consumes the trigger file if it is there.

        Consuming by unlink is atomic, so a request made while the manager
        checks is either seen now or on the next check, never lost.
        """
        try:
            fsutil._unlink(os.path.join(self.root, FLUSH))
        except FileNotFoundError:
            return False
        return True


def _checked(queue_id: str) -> str:
    """Refuse anything but a well-formed id before it becomes a path (CLI input)."""
    if not _ID.match(queue_id):
        raise NoSuchEntry(queue_id)
    return queue_id


def _fsync_file(path: str) -> None:
    """fsync a file written elsewhere: fsync flushes the inode, whichever fd wrote it."""
    fd = fsutil._open(path, os.O_RDONLY)
    try:
        fsutil._fsync(fd)
    finally:
        os.close(fd)


def _encode(entry: QueueEntry) -> bytes:
    return json.dumps(entry.to_json(), ensure_ascii=False, sort_keys=True, indent=1).encode("utf-8")


def _decode(queue_id: str, data: bytes) -> QueueEntry:
    """Parse an envelope; ValueError for anything that is not a valid entry."""
    try:
        entry = QueueEntry.from_json(json.loads(data.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"unreadable envelope {queue_id}") from e
    if entry.id != queue_id:
        raise ValueError(f"envelope {queue_id} names {entry.id!r}")
    if not _well_typed(entry):
        raise ValueError(f"envelope {queue_id} has fields of the wrong type")
    return entry


_NUMBER = (int, float)
_RECIPIENT_TYPES = {"address": str, "original": str, "local": bool, "status": str, "attempts": int,
                    "next_attempt": _NUMBER, "last_reply": str, "last_host": str, "notified": bool, "history": list}


def _well_typed(entry: QueueEntry) -> bool:
    """Valid JSON of the wrong types (a damaged or hand-edited file) is unreadable too:
    it would otherwise fail later, in the manager's scheduling or the admin listing."""
    if not (isinstance(entry.sender, str) and isinstance(entry.arrival, _NUMBER) and isinstance(entry.size, int)
            and isinstance(entry.user, str) and isinstance(entry.peer, str)
            and isinstance(entry.delay_warned, bool) and isinstance(entry.recipients, list)):
        return False
    for r in entry.recipients:
        for name, kind in _RECIPIENT_TYPES.items():
            value = getattr(r, name)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                return False
        if not all(isinstance(h, dict) for h in r.history):
            return False
    return True
