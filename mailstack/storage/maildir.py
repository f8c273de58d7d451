# -*- test-case-name: tests.storage.test_maildir -*-
"""Maildir delivery: the one writer of ``data_dir/mail/<domain>/<localpart>/``.

A Maildir (https://cr.yp.to/proto/maildir.html) is read by Dovecot, mutt,
Python's ``mailbox.Maildir`` and our POP3 server without any locking, because a
message appears in ``new/`` only by an atomic rename of a complete, fsynced file:

1. create ``tmp/<unique>`` exclusively and stream the bytes into it;
2. fsync the file (its bytes are on disk);
3. rename it to ``new/<unique>,S=<size>,W=<wire size>`` (readers now see it, whole);
4. fsync ``new/`` (the rename itself is on disk).

Only after step 4 does ``deliver`` return, so the queue may then mark the
recipient delivered and eventually drop its copy.  A failure at any step
removes what this call created and raises the OSError: the caller sees either
no message or one complete message, never a partial one in ``new/``.

Unique names are ``<sec>.M<usec>P<pid>Q<seq>.<host>,S=<size>,W=<wire size>``
(the Maildir "modern" form plus Dovecot's ``,S=`` file size and ``,W=`` size
with CRLF line ends, so that Dovecot and our POP3 server need neither a
``stat`` nor a read to answer LIST and STAT).  The pid is read at each call,
not at import time, because ``twistd`` forks when it daemonizes; the sequence
number makes names unique within a process even when the clock stands still.

The OS calls go through ``fsutil``'s indirections (``_open``, ``_write``,
``_fsync``, ``_rename``, ``_unlink``) so that tests can make any step fail.
All methods block: callers on the reactor thread use ``run_blocking``.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Union

from zope.interface import implementer

from mailstack.address import Address, mailbox_components, parse_address
from mailstack.interfaces import IMaildirStore
from mailstack.storage import fsutil
from mailstack.storage.dirsync import DirSyncs

CHUNK = 64 * 1024

# Process-wide, so that two MaildirStore objects never hand out the same name;
# next() on itertools.count is atomic under the GIL, so threads may share it.
_SEQUENCE = itertools.count()

#: A message source: a path to a file to copy, or the bytes themselves in chunks.
Source = Union[str, "os.PathLike[str]", bytes, Iterable[bytes]]


def escape_host(host: str) -> str:
    """The host part of a unique name: ``/`` and ``:`` escaped as the spec says.

    ``/`` would make a path and ``:`` starts the info part (``:2,S``), so the
    Maildir spec replaces them with ``\\057`` and ``\\072``.
    """
    return host.replace("/", "\\057").replace(":", "\\072")


def _chunks_of(source: Source) -> Iterable[bytes]:
    """Stream ``source`` in CHUNK-sized pieces without reading a file whole."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
        return
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    return
                yield chunk
    yield from source


class WireSize:
    """Dovecot's ``,W=`` size, counted as the bytes stream past.

    The octets of the message with CRLF line endings (a final CRLF added if
    missing), which is what POP3 reports in LIST/STAT (RFC 1939 section 11:
    the dot-stuffing is not counted).  Deliveries record it in the file name so
    that readers need not open the file to know it.
    """

    __slots__ = ("size", "_bare", "_prev_cr", "_last")

    def __init__(self) -> None:
        self.size = 0
        self._bare = 0
        self._prev_cr = False
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        crlf = chunk.count(b"\r\n") + (1 if self._prev_cr and chunk[:1] == b"\n" else 0)
        self._bare += chunk.count(b"\n") - crlf
        self._prev_cr = chunk[-1:] == b"\r"
        self._last = chunk[-1:]

    @property
    def value(self) -> int:
        missing_end = 2 if self.size and self._last != b"\n" else 0
        return self.size + self._bare + missing_end


def wire_size_of(chunks: Iterable[bytes]) -> int:
    """``WireSize`` of a whole message given as chunks."""
    wire = WireSize()
    for chunk in chunks:
        wire.feed(chunk)
    return wire.value


@implementer(IMaildirStore)
class MaildirStore:
    """All users' Maildirs under ``root`` (``data_dir/mail``).

    ``clock`` and ``hostname`` are injectable for deterministic names in tests.
    """

    def __init__(self, root: str, hostname: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.root = os.path.abspath(root)
        self._host = escape_host(hostname or socket.gethostname())
        self._clock = clock
        # Maildirs known to have tmp/ new/ cur/, checked once per process.  One
        # can vanish while the server runs (``mailstack user del`` moves it to
        # mail/.deleted/): ``prepare`` then creates it again.  set.add is
        # atomic under the GIL.
        self._known: set[str] = set()
        # Threads publishing into one new/ at once share its fsync.
        self._syncs = DirSyncs()

    def path_for(self, address: Address | str) -> str:
        """The Maildir of ``address``: ``root/<domain>/<localpart>``.

        The only place a path is built from an address; ``mailbox_components``
        refuses anything that is not a safe single path component (AddressError).
        """
        if isinstance(address, str):
            address = parse_address(address)
        domain, local = mailbox_components(address)
        return os.path.join(self.root, domain, local)

    def unique_name(self) -> str:
        """A fresh ``<sec>.M<usec>P<pid>Q<seq>.<host>`` (without the ``,S=`` size)."""
        now = self._clock()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(_SEQUENCE)}.{self._host}"

    def deliver(self, address: Address | str, source: Source, prefix: bytes = b"") -> str:
        """Write ``prefix`` then ``source`` as one new message; return its file name.

        Creates ``tmp/ new/ cur/`` durably on first delivery.  Raises OSError
        (nothing left behind) or AddressError (no such mailbox name).
        ``prepare`` + ``publish`` of a batch of one.
        """
        pending = self.prepare(address, source, prefix)
        error = self.publish([pending])[0]
        if error is not None:
            raise error
        return pending.name

    def prepare(self, address: Address | str, source: Source, prefix: bytes = b"") -> Pending:
        """Steps 1-2 for one message: ``tmp/<unique>`` written and fsynced.

        Invisible to readers until ``publish``; on failure nothing is left and
        the error is raised.  A ``Pending`` that is never published can be
        dropped with ``discard`` (a crash leaves it in ``tmp/``, which readers
        ignore, as the Maildir spec says).
        """
        maildir = self.path_for(address)
        new_dir = os.path.join(maildir, "new")
        known = maildir in self._known
        if not known:
            self._create(maildir)
        name = self.unique_name()
        tmp_path = os.path.join(maildir, "tmp", name)
        try:
            wire = self._write_tmp(tmp_path, prefix, source)
        except FileNotFoundError:
            if not known:
                raise
            # Removed behind our back since we last looked: create it again.
            self._known.discard(maildir)
            self._create(maildir)
            wire = self._write_tmp(tmp_path, prefix, source)
        # ,S= (file size) and Dovecot's ,W= (size with CRLF line ends): POP3
        # readers, ours and Dovecot's, take LIST/STAT sizes from the name.
        return Pending(tmp_path, new_dir, f"{name},S={wire.size},W={wire.value}")

    def _create(self, maildir: str) -> None:
        """Make sure ``tmp/ new/ cur/`` exist durably, and remember it."""
        if not os.path.isdir(os.path.join(maildir, "new")):
            for sub in ("tmp", "new", "cur"):
                fsutil.ensure_dir(os.path.join(maildir, sub))
        self._known.add(maildir)

    def publish(self, pending: list[Pending]) -> list[BaseException | None]:
        """Steps 3-4 for a batch: rename each into ``new/``, one fsync per ``new/``
        (shared with the other threads publishing there at the same time).

        Returns per message None (delivered: durable and visible) or the error
        that failed it; a failed message is taken back (no file left), so the
        caller may retry it without risking a duplicate.  A rename error fails
        that message only; a failed fsync of a ``new/`` fails every message of
        the batch in that folder.
        """
        errors: list[BaseException | None] = [None] * len(pending)
        folders: dict[str, list[int]] = {}
        for i, p in enumerate(pending):
            try:
                fsutil._rename(p.tmp_path, p.new_path)
            except Exception as e:
                errors[i] = e
                _discard(p.tmp_path)
                continue
            folders.setdefault(p.new_dir, []).append(i)
        for folder, members in folders.items():
            try:
                self._syncs.sync(folder)
            except Exception as e:
                # The renames may or may not survive a crash; we report failure, so
                # take the messages back rather than risk a duplicate on the retry.
                for i in members:
                    errors[i] = e
                    _discard(pending[i].new_path)
        return errors

    @staticmethod
    def discard(pending: Pending) -> None:
        """Drop a prepared message that will not be published."""
        _discard(pending.tmp_path)

    def _write_tmp(self, path: str, prefix: bytes, source: Source) -> WireSize:
        """Create ``path`` exclusively, stream into it, fsync; return its WireSize."""
        fd = fsutil._open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        wire = WireSize()
        try:
            try:
                if prefix:
                    fsutil.write_fd(fd, prefix)
                    wire.feed(prefix)
                for chunk in _chunks_of(source):
                    fsutil.write_fd(fd, chunk)
                    wire.feed(chunk)
                fsutil._fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _discard(path)
            raise
        return wire


class Pending:
    """A message written to a Maildir's ``tmp/`` and fsynced, not yet in ``new/``."""

    __slots__ = ("tmp_path", "new_dir", "name")

    def __init__(self, tmp_path: str, new_dir: str, name: str) -> None:
        self.tmp_path = tmp_path
        self.new_dir = new_dir
        self.name = name  # the final file name in new/

    @property
    def new_path(self) -> str:
        return os.path.join(self.new_dir, self.name)


def _discard(path: str) -> None:
    """Best-effort removal while another error is already on its way up."""
    try:
        fsutil._unlink(path)
    except OSError:
        pass
