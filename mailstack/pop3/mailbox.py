# -*- test-case-name: tests.pop3.test_mailbox -*-
"""A POP3 maildrop over one Maildir: lock, snapshot, sizes, UIDLs, deletion.

Everything here blocks (directory listings, reads, fsync) and has no Twisted
import: ``pop3/server.py`` calls it through ``run_blocking``, except
``WireEncoder`` which is pure.

Snapshot (RFC 1939 section 3, AUTHORIZATION -> TRANSACTION)
    ``Maildrop.open(path)`` takes the session lock, moves ``new/X`` to
    ``cur/X:2,`` as every Maildir reader does, and lists ``cur/``.  The list is
    fixed for the session: message numbers never change, messages arriving later
    are seen by the next session.

UIDL (RFC 1939 section 7)
    The UIDL of a message is its Maildir *unique name*: the file name up to the
    first ``:``.  Flag changes by other readers (``X:2,`` -> ``X:2,S``) and the
    move from ``new/`` to ``cur/`` keep it, so it is stable forever.  Names longer
    than 70 characters or with characters outside 0x21-0x7E are replaced by their
    SHA-1 in hex (RFC 1939 limits a UIDL to 70 characters in that range).

Sizes (RFC 1939 sections 5 and 11)
    The size of a message is the number of octets the client receives for it:
    the file with every line ending as CRLF (a bare LF counts as two octets) and
    a final CRLF added when the file does not end with a line ending.  As section
    11 requires, the byte-stuffing dots and the terminating ``.CRLF`` are not
    counted ("lines in the message which start with the termination octet need
    not (and must not) be counted twice").  So LIST/STAT equal exactly what RETR
    transmits minus the stuffing and terminator, which is the length of the
    message poplib and every other client hands back.  ``WireEncoder`` produces
    those bytes and ``wire_size`` counts them; tests check they agree.

Index (``<maildir>/mailstack-pop3-index.json``)
    Like Dovecot's ``dovecot-uidlist``: a cache so that login, STAT, LIST and UIDL
    on a large mailbox never stat or read old messages.  UTF-8 JSON::

        {"version": 1, "messages": [["<unique name>", <size>], ...]}

    in first-seen order (which is the order of message numbers).  Only names
    not in the index are read to compute their size.  Maildir file contents never
    change, so an entry stays right for as long as the name exists; entries
    whose message is gone are dropped.  Written with ``fsutil.write_atomic`` only
    while holding the session lock and only when it changed.  A missing or
    unreadable index is rebuilt (it is a cache, nothing is lost).

Lock (``<maildir>/mailstack-pop3.lock``)
    ``fsutil.locked(..., blocking=False)`` held from login to the end of the
    session: one POP3 session per mailbox, across processes; the second gets
    ``MailboxInUse`` (``-ERR [IN-USE]``).  flock dies with the process.

Deletion (RFC 1939 section 6)
    DELE only marks, in memory.  ``Maildrop.expunge`` runs in the UPDATE state
    (QUIT): it unlinks the marked files and fsyncs ``cur/`` once.  A session that
    ends any other way deletes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import AbstractContextManager
from typing import BinaryIO, Iterable

from mailstack.storage import fsutil

INDEX_NAME = "mailstack-pop3-index.json"
LOCK_NAME = "mailstack-pop3.lock"
INDEX_VERSION = 1

# Indirections for fault-injection tests.
_rename = os.rename
_listdir = os.listdir
_open = open

_READ_SIZE = 1 << 20


class MailboxInUse(Exception):
    """Another session holds the maildrop's lock."""


class MessageGone(Exception):
    """The message file disappeared (another reader deleted it)."""


class Message:
    """One message of the snapshot.  ``number`` is 1-based and never changes."""

    __slots__ = ("number", "unique", "name", "size", "deleted")

    def __init__(self, number: int, unique: str, name: str, size: int) -> None:
        self.number = number
        self.unique = unique
        self.name = name  # file name in cur/ (may change if another reader renames it)
        self.size = size
        self.deleted = False

    @property
    def uidl(self) -> str:
        return uidl_for(self.unique)

    def __repr__(self) -> str:
        return f"<Message {self.number} {self.unique!r} {self.size}>"


def uidl_for(unique: str) -> str:
    """RFC 1939 section 7: 1-70 characters in 0x21-0x7E."""
    if 0 < len(unique) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in unique):
        return unique
    return hashlib.sha1(unique.encode("utf-8", "surrogateescape")).hexdigest()


def unique_name(filename: str) -> str:
    """The Maildir unique name: the file name up to the info part (``:2,...``)."""
    return filename.split(":", 1)[0]


def _age_key(unique: str) -> tuple[int, str]:
    # Unique names start with the delivery time in seconds.
    head = unique.split(".", 1)[0]
    return (int(head) if head.isdigit() else 0, unique)


# -- the wire form ----------------------------------------------------------


def wire_size_of(chunks: Iterable[bytes]) -> int:
    """Octets of the message as transmitted (CRLF line ends), stuffing excluded."""
    size = 0
    bare = 0
    prev_cr = False
    last = b""
    for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        lf = chunk.count(b"\n")
        crlf = chunk.count(b"\r\n") + (1 if prev_cr and chunk[:1] == b"\n" else 0)
        bare += lf - crlf
        prev_cr = chunk[-1:] == b"\r"
        last = chunk[-1:]
    if size and last != b"\n":
        size += 2
    return size + bare


def wire_size(path: str) -> int:
    """``wire_size_of`` for a file, read in chunks."""
    with _open(path, "rb") as f:
        return wire_size_of(iter(lambda: f.read(_READ_SIZE), b""))


class WireEncoder:
    """Turns message bytes into the body of a RETR/TOP reply, chunk by chunk.

    RFC 1939 section 3: CRLF line endings, lines starting with "." get one more
    ".", and the reply ends with ``.CRLF`` (a CRLF is added first if the message
    does not end with one).  With ``body_lines`` (TOP, RFC 1939 section 7) only the
    header, the blank line and that many body lines are sent; ``done`` turns true
    once they have been, and later input is ignored.
    """

    def __init__(self, body_lines: int | None = None) -> None:
        self._held_cr = False  # a CR at the end of the last chunk: CRLF may be split
        self._line_start = True  # the last byte emitted was LF (or nothing yet)
        self._in_header = True
        self._remaining = body_lines
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._held_cr = True
            if not data:
                return b""
        # CRLF stays, bare LF becomes CRLF, bare CR is passed as is.
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._remaining is not None:
            data = self._truncate(data)
        return self._stuff(data)

    def _truncate(self, data: bytes) -> bytes:
        start = 0
        if self._in_header:
            if self._line_start and data.startswith(b"\r\n"):
                start = 2
            else:
                i = data.find(b"\r\n\r\n")
                if i < 0:
                    return data
                start = i + 4
            self._in_header = False
            if self._remaining == 0:
                self.done = True
                self._held_cr = False
                return data[:start]
        lfs = data.count(b"\n", start)
        if lfs < self._remaining:
            self._remaining -= lfs
            return data
        pos = start
        for _ in range(self._remaining):
            pos = data.index(b"\n", pos) + 1
        self.done = True
        self._held_cr = False
        return data[:pos]

    def _stuff(self, data: bytes) -> bytes:
        if not data:
            return data
        data = data.replace(b"\n.", b"\n..")
        if self._line_start and data[:1] == b".":
            data = b"." + data
        self._line_start = data[-1:] == b"\n"
        return data

    def end(self) -> bytes:
        """The rest of the reply: held bytes, a final CRLF if needed, ``.CRLF``."""
        out = b""
        if self._held_cr and not self.done:
            out = b"\r"
            self._line_start = False
        self._held_cr = False
        if not self._line_start:
            out += b"\r\n"
            self._line_start = True
        return out + b".\r\n"


def encode_message(data: bytes, body_lines: int | None = None) -> bytes:
    """A whole small message as its reply body, terminator included."""
    enc = WireEncoder(body_lines)
    return enc.feed(data) + enc.end()


# -- the maildrop -----------------------------------------------------------


class Maildrop:
    """A locked snapshot of one Maildir for one POP3 session."""

    def __init__(self, path: str, lock: AbstractContextManager, messages: list[Message]) -> None:
        self.path = path
        self._lock: AbstractContextManager | None = lock
        self.messages = messages
        self.new_sizes = 0  # messages whose size had to be computed at open (for tests/benchmarks)

    # -- open ------------------------------------------------------------

    @classmethod
    def open(cls, path: str) -> "Maildrop":
        """Lock ``path`` (a Maildir, created if missing) and take the snapshot.

        Raises MailboxInUse if another session holds it, OSError on disk trouble.
        """
        for sub in ("tmp", "new", "cur"):
            fsutil.ensure_dir(os.path.join(path, sub))
        lock = fsutil.locked(os.path.join(path, LOCK_NAME), blocking=False)
        try:
            lock.__enter__()
        except BlockingIOError:
            raise MailboxInUse(path) from None
        try:
            drop = cls(path, lock, [])
            drop._snapshot()
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        return drop

    def _snapshot(self) -> None:
        new_dir = os.path.join(self.path, "new")
        cur_dir = os.path.join(self.path, "cur")
        moved = False
        for name in _listdir(new_dir):
            if name.startswith("."):
                continue
            target = name if ":" in name else name + ":2,"
            try:
                _rename(os.path.join(new_dir, name), os.path.join(cur_dir, target))
                moved = True
            except FileNotFoundError:  # another reader moved it first
                continue
        if moved:
            fsutil.fsync_dir(new_dir)
            fsutil.fsync_dir(cur_dir)

        files: dict[str, str] = {}
        for name in _listdir(cur_dir):
            if not name.startswith("."):
                files[unique_name(name)] = name

        index = self._load_index()
        changed = False
        entries: list[tuple[str, int]] = []
        for unique, size in index:
            if unique in files:
                entries.append((unique, size))
            else:
                changed = True
        known = {u for u, _ in entries}
        fresh = sorted((u for u in files if u not in known), key=_age_key)
        for unique in fresh:
            try:
                size = wire_size(os.path.join(cur_dir, files[unique]))
            except FileNotFoundError:
                continue  # deleted or renamed under us; the next session sees it
            entries.append((unique, size))
            changed = True
        self.new_sizes = len(fresh)
        self.messages = [Message(i, u, files[u], s) for i, (u, s) in enumerate(entries, 1)]
        if changed:
            self._save_index(entries)

    def _index_path(self) -> str:
        return os.path.join(self.path, INDEX_NAME)

    def _load_index(self) -> list[tuple[str, int]]:
        try:
            with _open(self._index_path(), "rb") as f:
                doc = json.loads(f.read())
            if doc.get("version") != INDEX_VERSION:
                return []
            return [(str(u), int(s)) for u, s in doc["messages"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []  # a cache: rebuild

    def _save_index(self, entries: list[tuple[str, int]]) -> None:
        doc = {"version": INDEX_VERSION, "messages": entries}
        data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
        fsutil.write_atomic(self._index_path(), data, sync_dir=False)

    # -- session ---------------------------------------------------------

    def _file(self, message: Message) -> str:
        return os.path.join(self.path, "cur", message.name)

    def _relocate(self, message: Message) -> bool:
        """Find the message again after another reader renamed it (flags)."""
        for name in _listdir(os.path.join(self.path, "cur")):
            if unique_name(name) == message.unique:
                message.name = name
                return True
        return False

    def open_message(self, message: Message) -> BinaryIO:
        """The message file opened for reading; MessageGone if it was deleted."""
        try:
            return _open(self._file(message), "rb")
        except FileNotFoundError:
            if not self._relocate(message):
                raise MessageGone(message.unique) from None
            try:
                return _open(self._file(message), "rb")
            except FileNotFoundError:
                raise MessageGone(message.unique) from None

    def read_start(self, message: Message, size: int) -> tuple[BinaryIO | None, bytes]:
        """Open and read the first ``size`` bytes.  The file comes back open only
        if there may be more; at EOF it is closed and None."""
        f = self.open_message(message)
        try:
            data = f.read(size)
            if len(data) < size:
                f.close()
                return None, data
            return f, data
        except BaseException:
            f.close()
            raise

    def expunge(self) -> int:
        """UPDATE state: unlink the messages marked deleted, fsync ``cur/``.

        Returns how many marked messages could not be removed.
        """
        failed = 0
        removed = 0
        for message in self.messages:
            if not message.deleted:
                continue
            try:
                if fsutil.unlink_durable(self._file(message), sync_dir=False):
                    removed += 1
                elif self._relocate(message) and fsutil.unlink_durable(self._file(message), sync_dir=False):
                    removed += 1
                # else: already gone, which is what was asked
            except OSError:
                failed += 1
        if removed:
            fsutil.fsync_dir(os.path.join(self.path, "cur"))
        return failed

    def close(self) -> None:
        """Release the lock.  Deletes nothing.  Idempotent."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    @property
    def closed(self) -> bool:
        return self._lock is None
