# -*- test-case-name: tests.pop3.test_mailbox -*-
"""A POP3 maildrop over one Maildir: lock, snapshot, sizes, UIDLs, deletion.

Everything here blocks (directory listings, reads, fsync) and has no Twisted
import: ``pop3/server.py`` calls it through ``run_blocking``, except
``WireEncoder`` (pure) and the first 64 KiB read of a RETR/TOP
(``read_start(..., relocate=False)``: one open and one read).

Snapshot (RFC 1939 section 3, AUTHORIZATION -> TRANSACTION)
    ``Maildrop.open(path)`` takes the session lock, lists ``new/``, then takes
    ``cur/`` from the index or a listing.  Messages in ``new/`` are numbered
    after those in ``cur/`` and read from where they are; they move to
    ``cur/X:2,`` at QUIT if not deleted.  So a download-and-delete session
    (most POP3 use) renames nothing: at login a rename per message cost about
    as much as the rest of the login.  The list is fixed for the session:
    message numbers never change, messages arriving later are seen by the next
    session.

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
    A name carrying Dovecot's ``,W=<size>`` (the size with CRLF line endings,
    which is this size) is believed, as Dovecot does, and the file is not read.

Index (``<maildir>/mailstack-pop3-index.json``)
    Like Dovecot's ``dovecot-uidlist``: a cache so that login, STAT, LIST and UIDL
    on a large mailbox never stat or read old messages.  ASCII JSON::

        {"version": 1, "cur_mtime_ns": <int or null>, "plain_uidls": <bool>,
         "names": ["<unique name>", ...], "sizes": [<size>, ...],
         "infos": {"<position>": "<info part, e.g. :2,S>", ...}}

    in first-seen order (which is the order of message numbers); flat arrays
    because that is what ``json`` parses fastest.  A file is ``cur/<name><info>``
    and ``infos`` lists only those whose info is not ``:2,``.  ``plain_uidls``
    says every name is its own UIDL, so nothing is scanned at login.

    As Dovecot does, when nothing came from ``new/`` and ``cur/``'s mtime equals
    ``cur_mtime_ns``, ``cur/`` is not even listed.  That mtime is recorded only
    when it is over 2 s old (``RACY_NS``; a change within the same clock tick
    as the recorded one could otherwise go unseen), else null; it is taken
    before the listing, so a change during the listing forces the next one.
    Otherwise only names not in the index, and without ``,W=``, are read to
    compute their size.
    Maildir file contents never change, so an entry stays right for as long as
    the name exists; entries whose message is gone are dropped.  Written
    only while holding the session lock and only when it changed, atomically
    (tmp file + rename) but without fsync, since it is a cache.  A missing or
    unreadable index is rebuilt.

Lock (``<maildir>/mailstack-pop3.lock``)
    ``fsutil.locked(..., blocking=False)`` held from login to the end of the
    session: one POP3 session per mailbox, across processes; the second gets
    ``MailboxInUse`` (``-ERR [IN-USE]``).  flock dies with the process.

Deletion (RFC 1939 section 6)
    DELE only marks, in memory.  ``Maildrop.update`` runs in the UPDATE state
    (QUIT): it unlinks the marked files, fsyncs once each folder that lost one,
    and moves the other messages of ``new/`` to ``cur/`` (``os.rename``
    relative to the two folders, not fsynced: a lost rename only leaves the
    message in ``new/``).  A session that ends any other way changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, BinaryIO

from mailstack.storage import fsutil
from mailstack.storage.maildir import wire_size_of

INDEX_NAME = "mailstack-pop3-index.json"
LOCK_NAME = "mailstack-pop3.lock"
INDEX_VERSION = 1

# Indirections for fault-injection tests.
_rename = os.rename
_unlink = os.unlink
_listdir = os.listdir
_open = open
_os_open = os.open

_READ_SIZE = 1 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

TMP_MAX_AGE = 36 * 3600  # the Maildir spec's limit for files left in tmp/


def _clean_tmp(tmp_dir: str, now: float) -> None:
    """Delete files left in ``tmp/`` for over 36 hours (a deliverer that crashed
    between writing and publishing), as the Maildir spec asks of readers.  Best
    effort: a file that is gone or cannot be removed is left to the next login."""
    try:
        names = _listdir(tmp_dir)
    except OSError:
        return
    for name in names:
        path = os.path.join(tmp_dir, name)
        try:
            if now - os.stat(path).st_mtime > TMP_MAX_AGE:
                os.unlink(path)
        except OSError:
            pass


class MailboxInUse(Exception):
    """Another session holds the maildrop's lock."""


class MessageGone(Exception):
    """The message file disappeared (another reader deleted it)."""


_UIDL_OK = re.compile(r"[\x21-\x7e]{1,70}\Z")
_UIDL_BAD_CHAR = re.compile(r"[^\x21-\x7e\n]")


def uidl_for(unique: str) -> str:
    """RFC 1939 section 7: 1-70 characters in 0x21-0x7E."""
    if _UIDL_OK.match(unique):
        return unique
    return hashlib.sha1(unique.encode("utf-8", "surrogateescape")).hexdigest()


def uidls_for(uniques: list[str]) -> list[str]:
    """``uidl_for`` of each; the common all-fine case costs one regex scan."""
    if not uniques:
        return []
    if max(map(len, uniques)) <= 70 and not _UIDL_BAD_CHAR.search("\n".join(uniques)) and all(uniques):
        return uniques
    return [uidl_for(u) for u in uniques]


def unique_name(filename: str) -> str:
    """The Maildir unique name: the file name up to the info part (``:2,...``)."""
    return filename.split(":", 1)[0]


DEFAULT_INFO = ":2,"  # what a message moved from new/ gets (no flags yet)
_INFO = re.compile(r":[^\n]*")

# An mtime is trusted only once it is this old: a change within the same clock
# tick as the one recorded would otherwise go unnoticed (Dovecot's "racy" rule).
RACY_NS = 2_000_000_000
_now_ns = time.time_ns


def _uniques_of(files: list[str]) -> list[str]:
    """``unique_name`` of each file name, at C speed (one regex over the joined list)."""
    if not files:
        return []
    return _INFO.sub("", "\n".join(files)).split("\n")


_W_SIZE = re.compile(r",W=(\d{1,15})(?=[,:]|\Z)")


def named_wire_size(unique: str) -> int | None:
    """The wire size a deliverer recorded in the name (``,W=<size>``), or None.

    Dovecot's convention: ``,W=`` is the size with CRLF line endings, which is
    what RETR sends (stuffing excluded).  ``,S=`` is the file size only, which
    differs for LF-stored mail, so it is not used.  Only the unique name is
    looked at (the info part after ``:`` never carries sizes).
    """
    if ",W=" not in unique:
        return None
    m = _W_SIZE.search(unique, unique.find(".") + 1)
    return int(m.group(1)) if m else None


def _trusted_mtime(mtime_ns: int) -> int | None:
    return mtime_ns if _now_ns() - mtime_ns > RACY_NS else None


_USEC = re.compile(r"\.M(\d+)")


def _age_key(unique: str) -> tuple[int, int, str]:
    # Unique names start with the delivery time in seconds, then (modern form)
    # ".M<microseconds>": numbered in delivery order as far as the names tell.
    head = unique.split(".", 1)[0]
    usec = _USEC.search(unique)
    return (int(head) if head.isdigit() else 0, int(usec.group(1)) if usec else 0, unique)


# -- the wire form ----------------------------------------------------------


def wire_size(path: str) -> int:
    """``wire_size_of`` for a file, read in chunks (plain os.read: no buffer object)."""
    fd = _os_open(path, os.O_RDONLY)
    try:
        first = os.read(fd, _READ_SIZE)
        if len(first) < _READ_SIZE:
            return wire_size_of((first,))

        def chunks() -> Iterator[bytes]:
            yield first
            while chunk := os.read(fd, _READ_SIZE):
                yield chunk

        return wire_size_of(chunks())
    finally:
        os.close(fd)


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
        # CRLF stays, bare LF becomes CRLF, bare CR is passed as is.  Mail stored
        # with CRLF (ours, most others') has no bare LF: two counts, no copies.
        if data.count(b"\n") != data.count(b"\r\n"):
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._remaining is not None:
            data = self._truncate(data)
        return self._stuff(data)

    def _truncate(self, data: bytes) -> bytes:
        assert self._remaining is not None  # only for TOP, which sets it
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


# A line starting with ".", found by ``re``'s literal-prefix scan: about three
# times faster than ``b"\n." in data`` (a two-byte substring search) on mail,
# where LF is common; this test runs on every RETR.
_DOT_LINE = re.compile(rb"\n\.")


def plain_message(data: bytes) -> bool:
    """True if ``data`` is already its own wire form (so the RETR reply is the
    bytes plus ``.CRLF``): CRLF line ends only, ending with one, no line
    starting with ".".  A few C scans, no copies: the usual stored message."""
    return (
        data[-2:] == b"\r\n"
        and data[:1] != b"."
        and _DOT_LINE.search(data) is None
        and data.count(b"\n") == data.count(b"\r\n")
    )


def encode_message(data: bytes, body_lines: int | None = None) -> bytes:
    """A whole small message as its reply body, terminator included."""
    enc = WireEncoder(body_lines)
    return enc.feed(data) + enc.end()


# -- the maildrop -----------------------------------------------------------


class Maildrop:
    """A locked snapshot of one Maildir for one POP3 session.

    Messages are indexed from 0 here (message number - 1) and kept in parallel
    lists, so a 50,000-message snapshot costs a few lists, not 50,000 objects.
    """

    def __init__(self, path: str, lock: AbstractContextManager) -> None:
        self.path = path
        self._cur_prefix = os.path.join(path, "cur", "")
        self._new_prefix = os.path.join(path, "new", "")
        self._lock: AbstractContextManager | None = lock
        self.uniques: list[str] = []
        self.sizes: list[int] = []
        self.uidls: list[str] = []
        self.deleted = bytearray()
        self.infos: dict[int, str] = {}  # i -> info part of the file name, where not ":2,"
        self.arrived: dict[int, str] = {}  # i -> file name in new/, for messages still there
        self.new_sizes = 0  # messages whose size had to be computed at open

    def __len__(self) -> int:
        return len(self.uniques)

    # -- open ------------------------------------------------------------

    @classmethod
    def open(cls, path: str) -> Maildrop:
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
            drop = cls(path, lock)
            drop._snapshot()
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        return drop

    def _snapshot(self) -> None:
        # new/ is listed before cur/: a message another reader moves to cur/
        # meanwhile is then in cur/'s listing too (and counted once), or is
        # followed there by _relocate; it is never missed.
        names = [n for n in _listdir(os.path.join(self.path, "new")) if n[:1] != "." and "\n" not in n]
        uniques, sizes, infos, plain, index_mtime = self._load_index()
        cur_mtime = os.stat(os.path.join(self.path, "cur")).st_mtime_ns
        # Like Dovecot: when cur/ has not changed since the index was written
        # (and that mtime was not "racy"), the index's file list is cur/.
        current = index_mtime is not None and index_mtime == cur_mtime
        if names or not current:
            # The mailbox changed: also the time to look for what a crashed
            # deliverer left in tmp/.
            _clean_tmp(os.path.join(self.path, "tmp"), time.time())
        if current:
            uidls = uniques if plain else uidls_for(uniques)
        else:
            uniques, sizes, infos, uidls = self._list_cur(uniques, sizes, infos, index_mtime, cur_mtime)
        if names:
            self._add_arrived(names, uniques, sizes, infos, uidls)
        else:
            self._set(uniques, sizes, infos, uidls)

    def _add_arrived(
        self, names: list[str], uniques: list[str], sizes: list[int], infos: dict[int, str], uidls: list[str]
    ) -> None:
        """Number the messages in new/ after those in cur/, by delivery time.

        They stay in new/ until QUIT (``update``): a download-and-delete
        session never renames them, and one that ends without QUIT changes
        nothing, like its deletions."""
        in_cur = set(uniques)
        arrived = sorted(
            ((u, n) for u, n in zip(_uniques_of(names), names, strict=True) if u not in in_cur),
            key=lambda un: _age_key(un[0]),
        )
        added: list[str] = []
        added_sizes: list[int] = []
        files: dict[int, str] = {}
        for unique, name in arrived:
            size = self._size(unique, self._new_prefix + name)
            if size is None:
                continue
            files[len(uniques) + len(added)] = name
            added.append(unique)
            added_sizes.append(size)
        self._set(uniques + added, sizes + added_sizes, infos, uidls + uidls_for(added))
        self.arrived = files

    def _list_cur(
        self, uniques: list[str], sizes: list[int], infos: dict[int, str], index_mtime: int | None, cur_mtime: int
    ) -> tuple[list[str], list[int], dict[int, str], list[str]]:
        """(unique names, sizes, infos, UIDLs) of the messages in cur/, listed,
        with the index's (``uniques``, ``sizes``, ``infos``) sizes reused and
        the index brought up to date."""
        cur_dir = os.path.join(self.path, "cur")
        listed = [n for n in _listdir(cur_dir) if n[:1] != "." and "\n" not in n]
        on_disk = dict(zip(_uniques_of(listed), listed, strict=False))
        changed = index_mtime != _trusted_mtime(cur_mtime)
        if len(uniques) != len(on_disk) or not on_disk.keys() >= set(uniques):
            keep = [i for i, u in enumerate(uniques) if u in on_disk]
            uniques = [uniques[i] for i in keep]
            sizes = [sizes[i] for i in keep]
            changed = True
        fresh = sorted(on_disk.keys() - set(uniques), key=_age_key) if len(on_disk) != len(uniques) else []
        for unique in fresh:
            size = self._size(unique, os.path.join(cur_dir, on_disk[unique]))
            if size is None:
                continue
            uniques.append(unique)
            sizes.append(size)
            changed = True
        new_infos = {}
        for i, u in enumerate(uniques):
            name = on_disk[u]
            if name != u + DEFAULT_INFO:
                new_infos[i] = name[len(u) :]
        if new_infos != infos:
            changed = True
        uidls = uidls_for(uniques)
        if changed:
            self._save_index(uniques, sizes, new_infos, uidls is uniques, _trusted_mtime(cur_mtime))
        return uniques, sizes, new_infos, uidls

    def _size(self, unique: str, path: str) -> int | None:
        """The wire size of a message not in the index: from its name (``,W=``),
        else read from ``path`` (counted in ``new_sizes``); None if it is gone
        (moved or deleted by another reader: the next session sees it)."""
        size = named_wire_size(unique)
        if size is None:
            try:
                size = wire_size(path)
            except FileNotFoundError:
                return None
            self.new_sizes += 1
        return size

    def _set(self, uniques: list[str], sizes: list[int], infos: dict[int, str], uidls: list[str]) -> None:
        self.uniques = uniques
        self.sizes = sizes
        self.infos = infos
        self.uidls = uidls
        self.deleted = bytearray(len(uniques))

    def _index_path(self) -> str:
        return os.path.join(self.path, INDEX_NAME)

    def _load_index(self) -> tuple[list[str], list[int], dict[int, str], bool, int | None]:
        """(unique names, sizes, infos, plain UIDLs, trusted mtime of cur/); empty if unusable."""
        empty: tuple[list[str], list[int], dict[int, str], bool, int | None] = ([], [], {}, False, None)
        try:
            with _open(self._index_path(), "rb") as f:
                doc = json.loads(f.read())
            if doc["version"] != INDEX_VERSION:
                return empty
            uniques, sizes, mtime, plain = doc["names"], doc["sizes"], doc["cur_mtime_ns"], doc["plain_uidls"]
            infos = {int(k): v for k, v in doc["infos"].items()}
            if len(uniques) != len(sizes) or any(not 0 <= k < len(uniques) for k in infos):
                return empty
            sum(sizes) + len("".join(uniques) + "".join(infos.values()))  # TypeError unless ints and strs
            if not (mtime is None or type(mtime) is int) or type(plain) is not bool:
                return empty
            return uniques, sizes, infos, plain, mtime
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return empty  # a cache: rebuild

    def _save_index(
        self, uniques: list[str], sizes: list[int], infos: dict[int, str], plain: bool, cur_mtime: int | None
    ) -> None:
        doc = {
            "version": INDEX_VERSION,
            "cur_mtime_ns": cur_mtime,
            "plain_uidls": plain,
            "names": uniques,
            "sizes": sizes,
            "infos": {str(k): v for k, v in infos.items()},
        }
        # ASCII JSON: names that are not UTF-8 (surrogate escapes) survive as \udcXX.
        data = json.dumps(doc, separators=(",", ":")).encode("ascii")
        # Replaced atomically but not fsynced (a cache, like Dovecot's index with
        # mail_fsync=optimized): after a crash it is the old one, or unreadable
        # and rebuilt, and either way checked against cur/ at the next login.
        path = self._index_path()
        tmp = os.path.join(self.path, f".tmp.{INDEX_NAME}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, 0o600)
        try:
            try:
                fsutil.write_fd(fd, data)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # -- session ---------------------------------------------------------

    def _file(self, i: int) -> str:
        name = self.arrived.get(i)
        if name is not None:
            return self._new_prefix + name
        return self._cur_prefix + self._cur_name(i)

    def _cur_name(self, i: int) -> str:
        return self.uniques[i] + self.infos.get(i, DEFAULT_INFO)

    def _relocate(self, i: int) -> bool:
        """Find message ``i`` in cur/ again after another reader renamed it
        (flags changed, or moved from new/)."""
        unique = self.uniques[i]
        for name in _listdir(os.path.join(self.path, "cur")):
            if name.partition(":")[0] == unique:
                self.infos[i] = name[len(unique) :]
                self.arrived.pop(i, None)
                return True
        return False

    def open_message(self, i: int, relocate: bool = True) -> BinaryIO:
        """Message ``i`` opened for reading; MessageGone if it was deleted.

        With ``relocate=False`` a renamed file raises FileNotFoundError instead of
        listing ``cur/`` (the caller retries in a thread).
        """
        return self._opened(i, lambda path: _open(path, "rb"), relocate)

    def _opened(self, i: int, opener: Callable[[str], Any], relocate: bool) -> Any:
        """``opener(path of message i)``, following the file once if another
        reader renamed it (flags added); MessageGone if it was deleted."""
        try:
            return opener(self._file(i))
        except FileNotFoundError:
            if not relocate:
                raise
            if not self._relocate(i):
                raise MessageGone(self.uniques[i]) from None
            try:
                return opener(self._file(i))
            except FileNotFoundError:
                raise MessageGone(self.uniques[i]) from None

    def read_start(self, i: int, size: int, relocate: bool = True) -> tuple[BinaryIO | None, bytes]:
        """Open message ``i`` and read its first ``size`` bytes.  The file comes
        back open only if there may be more; at EOF it is closed and None.

        Plain ``os.open``/``os.read`` (no buffered file object): this runs on the
        reactor thread for every RETR, and most messages are one read."""
        fd = self._opened(i, lambda path: _os_open(path, os.O_RDONLY | _O_CLOEXEC), relocate)
        try:
            data = os.read(fd, size)
            if len(data) < size:
                os.close(fd)
                return None, data
            return os.fdopen(fd, "rb", buffering=0), data
        except BaseException:
            os.close(fd)
            raise

    @property
    def changed(self) -> bool:
        """Whether QUIT has anything to do: messages marked deleted, or
        messages to move from new/ to cur/."""
        return bool(self.arrived) or any(self.deleted)

    def update(self) -> int:
        """The UPDATE state (RFC 1939 section 6, QUIT): unlink the messages
        marked deleted, move the others still in new/ to ``cur/X:2,`` (the
        client has seen them), and fsync once each folder that lost a message.

        Returns how many marked messages could not be removed.
        """
        failed = 0
        emptied: set[int] = set()  # the folders (fds) that lost a message
        with (
            fsutil.opened_dir(os.path.join(self.path, "new")) as new_fd,
            fsutil.opened_dir(os.path.join(self.path, "cur")) as cur_fd,
        ):
            for i in [i for i, flag in enumerate(self.deleted) if flag]:
                try:
                    folder = self._remove(i, new_fd, cur_fd)
                except OSError:
                    failed += 1
                    continue
                if folder is not None:
                    emptied.add(folder)
            moved = self._move_seen(new_fd, cur_fd)
            for folder in sorted(emptied):
                os.fsync(folder)
        if moved:
            self._index_cur()
        return failed

    def _remove(self, i: int, new_fd: int, cur_fd: int) -> int | None:
        """Unlink message ``i`` (relative to its folder: no path joins, no path
        walks), following it once if another reader renamed it.  Returns the
        folder it was removed from, or None if it was already gone, which is
        also what was asked."""
        name = self.arrived.get(i)
        folder = cur_fd if name is None else new_fd
        try:
            _unlink(self._cur_name(i) if name is None else name, dir_fd=folder)
            return folder
        except FileNotFoundError:
            if not self._relocate(i):  # found in cur/ if anywhere
                return None
        try:
            _unlink(self._cur_name(i), dir_fd=cur_fd)
        except FileNotFoundError:
            return None
        return cur_fd

    def _move_seen(self, new_fd: int, cur_fd: int) -> bool:
        """Move the undeleted messages still in new/ to cur/ (``X`` becomes
        ``X:2,``; a name with an info part keeps it), and record where they
        are now.  Not fsynced (Dovecot does not either): a rename lost in a
        crash only leaves the message in new/, to be moved again.  Returns
        whether any moved."""
        moved = False
        for i, name in list(self.arrived.items()):
            if self.deleted[i]:
                continue
            target = name if ":" in name else name + DEFAULT_INFO
            try:
                _rename(name, target, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
            except OSError:
                continue  # moved or removed by another reader, or left in new/ for the next session
            del self.arrived[i]
            info = target[len(self.uniques[i]) :]
            if info != DEFAULT_INFO:
                self.infos[i] = info
            moved = True
        return moved

    def _index_cur(self) -> None:
        """Write the index of the snapshot's messages now in cur/, so that the
        next login reads none of the sizes again.  Its mtime is left unknown:
        the next login lists cur/ and checks."""
        keep = [i for i in range(len(self.uniques)) if not self.deleted[i] and i not in self.arrived]
        uniques = [self.uniques[i] for i in keep]
        infos = {k: self.infos[i] for k, i in enumerate(keep) if i in self.infos}
        self._save_index(uniques, [self.sizes[i] for i in keep], infos, uidls_for(uniques) is uniques, None)

    def close(self) -> None:
        """Release the lock.  Deletes and moves nothing.  Idempotent."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    @property
    def closed(self) -> bool:
        return self._lock is None
