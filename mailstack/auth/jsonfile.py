# -*- test-case-name: tests.auth.test_userdb -*-
"""A small versioned JSON document on disk, re-read when it changes, rewritten atomically.

The users and aliases files share this machinery.  Readers (a running server)
call ``current()``, which costs one ``stat``: the file is parsed again only when
its (mtime, size, inode) changed, so an admin command's edit is seen without a
restart.  Writers (the admin command) call ``update(change)``, which holds an
exclusive ``flock`` on a lock file next to the document, re-reads the file (not
the cache: another process may have written since), applies ``change`` and
replaces the file with ``fsutil.write_atomic`` (tmp, fsync, rename, fsync dir).
Two admin commands at once therefore serialise and lose nothing.

``current()`` is called from the reactor thread and from pool threads (password
checks); the cached pair is replaced, never mutated, so the worst a race can do
is read the file once more than needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.logger import Logger

from mailstack.storage import fsutil


class FileFormatError(Exception):
    """The file exists but is not a document this version understands (one line)."""


class JSONFile:
    """``{"version": N, <field>: {...}}`` at ``path``, locked by ``lock_path``."""

    log = Logger()

    def __init__(self, path: str, lock_path: str, field: str, version: int) -> None:
        self.path = path
        self.lock_path = lock_path
        self.field = field
        self.version = version
        self._stamp: tuple[int, int, int] | None = None
        self._data: dict[str, Any] = {}
        self.current()  # a broken file is reported at start, not at the first login

    def _read(self) -> tuple[tuple[int, int, int] | None, dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return None, {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise FileFormatError(f"{self.path}: not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get(self.field), dict):
            raise FileFormatError(f'{self.path}: no "{self.field}" table')
        if doc.get("version") != self.version:
            raise FileFormatError(f"{self.path}: unsupported version {doc.get('version')!r}")
        return stamp, doc[self.field]

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> dict[str, Any]:
        """The document's table, re-read if the file changed since the last call.

        A file that became unreadable keeps the last good contents (and is
        logged): a running server never loses its users over a bad edit.
        """
        stamp = self._stat()
        if stamp != self._stamp or (stamp is None and self._data):
            try:
                self._stamp, self._data = self._read()
            except FileFormatError as e:
                if self._stamp is None and not self._data:
                    raise
                self.log.error("keeping previous contents: {error}", error=str(e))
                self._stamp = stamp
        return self._data

    @contextmanager
    def locked_view(self) -> Iterator[dict[str, Any]]:
        """The table as on disk, with the lock held for the block: a snapshot that
        no change interleaves with (an export written in step with the file)."""
        fsutil.ensure_dir(os.path.dirname(os.path.abspath(self.path)))
        with fsutil.locked(self.lock_path):
            yield self._read()[1]

    def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to a fresh copy under the lock and write it durably."""
        fsutil.ensure_dir(os.path.dirname(os.path.abspath(self.path)))
        with fsutil.locked(self.lock_path):
            _, data = self._read()
            data = dict(data)
            change(data)
            doc = {"version": self.version, self.field: dict(sorted(data.items()))}
            body = json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
            fsutil.write_atomic(self.path, body, mode=0o600)
            self._stamp, self._data = self._read()
