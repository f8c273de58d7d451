# -*- test-case-name: tests.queue.test_store -*-
"""The durable queue on disk: format, commit protocol, scan and crash recovery.

Blocking and free of Twisted imports, so that the admin command can use it on
the same directory while the server runs; the server calls it in threads.
The per-entry lock (``queue/locks.py``) keeps the two apart: the manager
saves with ``save_unless_deleted`` and ``queue delete`` removes with
``remove_entry``, so a deleted entry is never written back.

Layout under ``root`` (``data_dir/queue``)
------------------------------------------
``tmp/<id>``
    A message being received.  Not committed; emptied by ``recover()``.
``msg/<id>``
    The message bytes (Received: header first), immutable once committed:
    only for a message that was streamed to ``tmp/<id>`` (bigger than the
    intake holds in memory), or queued by an older version.
``env/<id>.json``
    The envelope: UTF-8 JSON of ``QueueEntry.to_json()`` (``version``, ``id``,
    ``sender``, ``arrival``, ``size``, ``user``, ``peer``, ``delay_warned`` and per
    recipient ``address``, ``original``, ``local``, ``status``, ``attempts``,
    ``next_attempt``, ``last_reply``, ``last_host``, ``notified``, ``history``).
    A message the intake held in memory is inside its envelope, under the key
    ``message`` (the bytes as a Latin-1 string, so every byte maps to one
    character): one file per message, like Postfix's queue file, instead of
    two to create, fsync, rename, read and delete.  Such an entry has no
    ``msg/<id>``.  Always replaced whole with ``fsutil.write_atomic``
    (temporary names start with ``.tmp.`` and are ignored by ``scan()``), a
    ``save`` carrying the ``message`` over.  **The envelope file is the commit
    record**, like Postfix's END record: a message exists for the queue
    exactly when its envelope does.  Its mtime, when set ahead of its change
    time by ``mark_attempt``, is the attempt mark: no retry before then.
``corrupt/``
    Unreadable envelopes (and their message, if any) and envelopes whose
    message is missing are moved here for inspection, never deleted.
``flush``
    The trigger file: the admin command creates it, the running manager
    consumes it with ``flush_requested()`` and retries everything at once.
``kick/<id>``
    Per-entry triggers (``queue release``, ``queue delete``): the running
    manager consumes them with ``kicks_requested()``, on the same poll as
    ``flush``, and looks at those entries again.

IDs are ``<14 hex digits of Unix microseconds><10 random hex digits>``: they
sort by arrival and are unique across processes without coordination.

Commit protocol (``commit``)
----------------------------
``commit(entry, data)``, one call per message in a pool thread, many in
parallel:

1. fsync ``tmp/<id>`` (the bytes are on disk) -- or, with ``data`` (the
   message held in memory), nothing: the message goes into the envelope;
2. write the envelope to ``env/.tmp.<id>.json`` and fsync it;
3. (a message in its own file only) rename ``tmp/<id>`` to ``msg/<id>``,
   then fsync ``msg/``;
4. rename ``env/.tmp.<id>.json`` to ``env/<id>.json``, then fsync ``env/``.

The ``msg/`` fsync comes before the envelope is renamed into place so that a
crash can never leave a durable envelope whose message rename was lost,
whatever the file system (this matters: ext4 without a journal, as on the
benchmark machine, orders nothing).  Only after step 4 is the message
acknowledged.  A crash before step 4 completes leaves a message without an
envelope (and maybe an envelope temporary): it was never acknowledged, and
``recover()`` deletes both.  The file fsyncs run in parallel (the file system
folds concurrent fsyncs into shared commits); a directory fsync is shared by
every thread that renamed into that directory while the previous fsync of it
ran (``storage.dirsync``), which is what makes the commit cheap under load:
group commit, with one thread hand-off per message.

Failures: an error in an entry's own step fails that entry only; a failed
directory fsync fails every entry that was waiting for it.  Every failed
entry is removed again (envelope first), so a failure never leaves anything
half-written.

An envelope that holds no message while ``msg/<id>`` is missing cannot
come from this protocol (damage from outside): ``load`` moves it to
``corrupt/`` when it meets it, as the start-up scan does.

``remove`` deletes the envelope first and then the message (if any).  With
``sync=True`` (the default, used by ``queue delete``) the envelope removal is
fsynced; after a final delivery the caller may pass ``sync=False``: if a crash
undoes the removal, the entry is simply delivered again (at-least-once), and
the next commit's ``env/`` fsync makes it durable anyway.

A crash between the envelope and the message removal leaves an orphan message
that ``recover()`` deletes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from zope.interface import implementer

from mailstack.interfaces import IQueueCommit, IQueueStore
from mailstack.queue.entry import (
    ENTRY_OPTIONAL,
    RECIPIENT_OPTIONAL,
    QueueEntry,
    RecipientState,
    well_formed,
)
from mailstack.storage import fsutil
from mailstack.storage.dirsync import DirSyncs

TMP = "tmp"
MSG = "msg"
ENV = "env"
CORRUPT = "corrupt"
FLUSH = "flush"
KICK = "kick"
CHUNK = 64 * 1024  # write buffer of a message being received
HEADER_LIMIT = 65536  # bytes of original headers read for a DSN or ``queue show``
MESSAGE_KEY = "message"  # the envelope's key for a message stored inside it

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


@implementer(IQueueStore, IQueueCommit)
class QueueStore:
    """The queue directory ``root``; every method blocks."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._dirs = {name: os.path.join(self.root, name) for name in (TMP, MSG, ENV, CORRUPT)}
        self._ready = False  # msg/ and env/ are known to exist (they are never removed)
        self._tmp_ready = False
        # Threads committing at the same time share the fsyncs of msg/ and env/.
        self._syncs = DirSyncs()

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
        self._ensure_tmp()
        fd = fsutil._open(self.tmp_path(queue_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "wb", buffering=CHUNK)

    def _ensure_tmp(self) -> None:
        if not self._tmp_ready:
            fsutil.ensure_dir(self._dirs[TMP])
            self._tmp_ready = True  # tmp/ is never removed while we run

    def env_tmp_path(self, queue_id: str) -> str:
        """Where ``commit`` writes the envelope before renaming it into place."""
        return os.path.join(self._dirs[ENV], ".tmp." + _checked(queue_id) + _ENV_SUFFIX)

    def commit(self, entry: QueueEntry, data: bytes | None = None) -> None:
        """Make ``tmp/<entry.id>`` (or ``data``, inside the envelope) a queued
        message: steps 1-4 of the protocol in the module doc, in the calling
        (pool) thread; the directory fsyncs are shared with the threads
        committing at the same time.

        ``data``: the whole message, held in memory by the caller, written
        inside the envelope (one file); without it the caller streamed the
        message to ``tmp/<id>`` with ``open_tmp``.  On any failure everything
        of this id is removed again and the error is raised: the message was
        not accepted and nothing half-written remains.
        """
        queue_id = entry.id
        try:
            self._ensure_ready()
            if data is None:
                _fsync_file(self.tmp_path(queue_id))
                fsutil.write_new(self.env_tmp_path(queue_id), _encode(entry))
                fsutil._rename(self.tmp_path(queue_id), self.message_path(queue_id))
                # Before any envelope names it: see "Commit protocol".
                self._syncs.sync(self._dirs[MSG])
            else:
                fsutil.write_new(self.env_tmp_path(queue_id), _encode(entry, data))
            fsutil._rename(self.env_tmp_path(queue_id), self.envelope_path(queue_id))
            self._syncs.sync(self._dirs[ENV])
        except BaseException:
            self.discard(queue_id)
            raise

    def _ensure_ready(self) -> None:
        if not self._ready:
            fsutil.ensure_dir(self._dirs[MSG])
            fsutil.ensure_dir(self._dirs[ENV])
            self._ready = True

    def discard(self, queue_id: str) -> None:
        """Remove every file of an entry that is not (or no longer) accepted, envelope first.

        Best effort and without fsyncs: ``recover()`` removes whatever a crash keeps.
        """
        paths = (
            self.envelope_path(queue_id),
            self.env_tmp_path(queue_id),
            self.message_path(queue_id),
            self.tmp_path(queue_id),
        )
        for path in paths:
            try:
                fsutil._unlink(path)
            except OSError:
                pass

    def save(self, entry: QueueEntry, keep_hold: bool = False) -> None:
        """Replace the envelope of a committed entry (new attempt state).

        A message inside the envelope is carried over: it is read from the
        envelope being replaced, and an error reading it is raised rather
        than writing an envelope without it.  ``keep_hold``: the hold of the
        envelope being replaced is kept (the admin command's ``queue hold``,
        during a delivery attempt), taken from the same read; an unreadable
        envelope is then moved to ``corrupt/`` and ``entry`` replaces it.
        """
        message = None
        try:
            data = fsutil.read_small(self.envelope_path(entry.id))
        except FileNotFoundError:
            pass
        else:
            try:
                current, message = _decode(entry.id, data)
            except ValueError:
                if not keep_hold:
                    raise
                self._move_to_corrupt(entry.id)
            else:
                if keep_hold:
                    entry.held_since, entry.held_time = current.held_since, current.held_time
        fsutil.write_atomic(self.envelope_path(entry.id), _encode(entry, message))

    def mark_attempt(self, queue_id: str, not_before: float) -> None:
        """Record that the entry is being tried: no retry before ``not_before``.

        The envelope's mtime becomes ``not_before`` (Postfix's qmgr does the
        same with ``utime``): one system call, no file created or removed,
        and never half-written.  No fsync: a process crash keeps it (the page
        cache survives the process); a system crash may lose it, which only
        means an earlier retry.  The next ``save`` replaces the envelope, and
        with it the mark.  NoSuchEntry if the entry is gone.
        """
        try:
            os.utime(self.envelope_path(queue_id), (not_before, not_before))
        except FileNotFoundError:
            raise NoSuchEntry(queue_id) from None

    def attempt_mark(self, queue_id: str) -> float:
        """The time ``mark_attempt`` set; 0.0 if there is none (or no entry).

        A mark is an mtime set ahead of the inode's change time: ``utime``
        stamps the change time with the real "now" (POSIX), while an
        ordinary write or rename leaves mtime <= ctime.  So the test needs
        no clock, and a file written by a clock set ahead is no mark.
        """
        try:
            return attempt_mark_of(os.stat(self.envelope_path(queue_id)))
        except (FileNotFoundError, NoSuchEntry):
            return 0.0

    def remove(self, queue_id: str, sync: bool = True, message_file: bool = True) -> bool:
        """Drop an entry: envelope first, then the message.

        False if there was no envelope.  ``sync`` fsyncs ``env/`` after the
        envelope unlink; without it a crash may bring the entry back, which
        only means a second delivery (see the module doc).  The message unlink
        is never fsynced: if a crash undoes it, ``recover()`` deletes the orphan.
        ``message_file=False``: the caller knows the message was inside the
        envelope, so there is no ``msg/<id>`` to unlink.
        """
        gone = fsutil.unlink_durable(self.envelope_path(queue_id), sync_dir=sync)
        if message_file:
            fsutil.unlink_durable(self.message_path(queue_id), sync_dir=False)
        return gone

    # -- reading ------------------------------------------------------------

    def load(self, queue_id: str) -> QueueEntry:
        """The entry ``queue_id``; NoSuchEntry, or CorruptEntry after moving it aside."""
        return self.load_message(queue_id)[0]

    def load_message(self, queue_id: str) -> tuple[QueueEntry, bytes | None]:
        """The entry and its message when that is inside the envelope (else None:
        it is in ``message_path``), from one read.

        NoSuchEntry, or CorruptEntry after moving aside an envelope that is
        unreadable or has no message anywhere.
        """
        if not _ID.match(queue_id):
            raise NoSuchEntry(queue_id)
        try:
            data = fsutil.read_small(self.envelope_path(queue_id))
        except FileNotFoundError:
            raise NoSuchEntry(queue_id) from None
        try:
            entry, message = _decode(queue_id, data)
        except ValueError:
            self._move_to_corrupt(queue_id)
            raise CorruptEntry(queue_id) from None
        if message is None and not os.path.exists(self.message_path(queue_id)):
            if not os.path.exists(self.envelope_path(queue_id)):
                raise NoSuchEntry(queue_id)  # removed (envelope, then message) while we read
            self._move_to_corrupt(queue_id)
            raise CorruptEntry(queue_id)
        return entry, message

    def read_message(self, queue_id: str) -> bytes:
        """The whole message, from the envelope or ``msg/<id>`` (a DSN with RET=FULL)."""
        message = self.load_message(queue_id)[1]
        if message is not None:
            return message
        with open(self.message_path(queue_id), "rb") as f:
            return f.read()

    def message_headers(self, queue_id: str, limit: int = HEADER_LIMIT) -> bytes:
        """The message's header section, up to ``limit`` bytes (``read_headers``);
        b"" if it cannot be read."""
        try:
            message = self.load_message(queue_id)[1]
        except KeyError:
            return b""
        if message is None:
            return read_headers(self.message_path(queue_id), limit)
        return _header_section(io.BytesIO(message), limit)

    def read_envelope(self, queue_id: str) -> tuple[bytes, float]:
        """The envelope's raw bytes and its attempt mark, from one open (the start-up scan).

        NoSuchEntry if there is none; the bytes are not checked (``load`` does that).
        """
        try:
            data, st = fsutil.read_small_stat(self.envelope_path(queue_id))
        except FileNotFoundError:
            raise NoSuchEntry(queue_id) from None
        return data, attempt_mark_of(st)

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

    def recover(self, read_envelopes: bool = True) -> Recovery:
        """Bring the directory to a consistent state after a crash.

        Call once at start, before any mail is accepted: it empties ``tmp/``,
        removes stale envelope temporaries, deletes messages without an envelope
        (their commit never finished, so they were never acknowledged) and moves
        envelopes without a message, or unreadable ones, to ``corrupt/``.

        ``read_envelopes=False`` only lists the directories (fast with a large
        queue): unreadable envelopes, and envelopes with no message in them or
        in ``msg/``, are left for ``scan()``/``load()``, which move them aside
        when they meet them.
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
        if read_envelopes:
            for queue_id in sorted(envelopes):
                try:
                    self.load(queue_id)
                except CorruptEntry:
                    corrupt.append(queue_id)
        # Without reading, an envelope without msg/<id> may hold its message:
        # ``load`` and the start-up scan move it aside if it does not.
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

    def request_kick(self, queue_id: str) -> None:
        """Ask the running manager to look at one entry again (it was released or deleted)."""
        folder = os.path.join(self.root, KICK)
        fsutil.ensure_dir(folder)
        fsutil.write_atomic(os.path.join(folder, _checked(queue_id)), b"")

    def kicks_requested(self) -> list[str]:
        """The ids of ``request_kick`` since the last call (consumes them)."""
        folder = os.path.join(self.root, KICK)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if not _ID.match(name):
                continue  # a temporary file of write_atomic
            try:
                fsutil._unlink(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            out.append(name)
        return out

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


def read_headers(path: str, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of a stored message, up to ``limit`` bytes (blocking)."""
    try:
        with open(path, "rb") as f:
            return _header_section(f, limit)
    except OSError:
        return b""


def _header_section(f: IO[bytes], limit: int) -> bytes:
    out = bytearray()
    for line in f:
        if line in (b"\r\n", b"\n"):
            break
        if len(out) + len(line) > limit:
            break
        out += line
    return bytes(out)


def attempt_mark_of(st: os.stat_result) -> float:
    """The attempt mark in an envelope's stat (see ``QueueStore.attempt_mark``), or 0.0."""
    return st.st_mtime if st.st_mtime_ns > st.st_ctime_ns else 0.0


def id_time(queue_id: str) -> float | None:
    """When the entry was made, from its id (Unix seconds); None for a malformed id."""
    if not _ID.match(queue_id):
        return None
    return int(queue_id[:14], 16) / 1e6


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


_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(QueueEntry))
_RCPT_FIELDS = tuple(f.name for f in dataclasses.fields(RecipientState))


def _fields(obj: object, names: tuple[str, ...], optional: dict[str, Any]) -> dict[str, Any]:
    """The JSON keys of ``obj``: optional ones only when not at their default (see queue/entry.py)."""
    data = {}
    for name in names:
        value = getattr(obj, name)
        if name not in optional or value != optional[name]:
            data[name] = value
    return data


def _encode(entry: QueueEntry, message: bytes | None = None) -> bytes:
    """The envelope file's bytes: ``entry.to_json()`` as compact UTF-8 JSON, plus
    ``message`` (the message inside the envelope) as a Latin-1 string.

    Built without ``dataclasses.asdict`` (a deep copy) and without ``indent``
    (which forces the pure-Python encoder): this runs once per accepted message
    and was ~5% of the server's Python time.  Same JSON value as ``to_json()``.
    """
    data = _fields(entry, _ENTRY_FIELDS, ENTRY_OPTIONAL)
    data["recipients"] = [
        _fields(r, _RCPT_FIELDS, RECIPIENT_OPTIONAL) | {"history": [dict(h) for h in r.history]}
        for r in entry.recipients
    ]
    if message is not None:
        data[MESSAGE_KEY] = message.decode("latin-1")
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _decode(queue_id: str, data: bytes) -> tuple[QueueEntry, bytes | None]:
    """Parse an envelope into the entry and the message inside it (or None);
    ValueError for anything that is not a valid entry."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable envelope {queue_id}") from e
    message = parsed.pop(MESSAGE_KEY, None) if type(parsed) is dict else None
    if not well_formed(parsed, queue_id) or not (message is None or type(message) is str):
        raise ValueError(f"envelope {queue_id} is not a valid entry")
    try:
        body = None if message is None else message.encode("latin-1")
    except UnicodeEncodeError as e:
        raise ValueError(f"envelope {queue_id} holds no valid message") from e
    return QueueEntry.from_json(parsed), body
