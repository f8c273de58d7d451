# -*- test-case-name: tests.storage.test_fsutil -*-
"""Durable file operations: the only way anything under data_dir is written.

The rule of the house: write a temporary name, fsync the file, rename it into
place, fsync the directory.  A crash at any moment leaves either the old state or
the new one, never a partial file under its final name.  All functions block;
callers on the reactor thread run them through a thread pool.

The OS calls are module attributes so that tests can make any step fail.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# Indirections for fault-injection tests.
_open = os.open
_write = os.write
_fsync = os.fsync
_rename = os.rename
_unlink = os.unlink


@contextmanager
def opened_dir(path: str) -> Iterator[int]:
    """A descriptor of the directory ``path``, for calls relative to it
    (``dir_fd=``) and its fsync; closed after the block."""
    fd = _open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (creations, renames, unlinks) durable."""
    with opened_dir(path) as fd:
        _fsync(fd)


def ensure_dir(path: str, mode: int = 0o700) -> None:
    """Create ``path`` and missing parents, fsyncing each parent that changed."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    ensure_dir(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        # Another thread is creating it and may not have fsynced the parent
        # yet; do it here too, so that we never return before it is durable.
        pass
    fsync_dir(parent)


def write_fd(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` (os.write may write less)."""
    view = memoryview(data)
    while view:
        n = _write(fd, view)
        view = view[n:]


def write_new(
    path: str, chunks: bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview], mode: int = 0o600
) -> None:
    """Create ``path`` exclusively, write ``chunks``, fsync; on failure remove it and raise."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            for chunk in chunks:
                write_fd(fd, chunk)
            _fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        try:
            _unlink(path)
        except OSError:
            pass
        raise


def write_atomic(path: str, chunks: bytes | Iterable[bytes], mode: int = 0o600, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``chunks``: tmp in the same folder, fsync, rename, fsync dir."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp.{os.path.basename(path)}.{os.getpid()}.{id(chunks):x}")
    write_new(tmp, chunks, mode)
    try:
        _rename(tmp, path)
    except BaseException:
        try:
            _unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(folder)


def unlink_durable(path: str, sync_dir: bool = True) -> bool:
    """Remove ``path`` and fsync its folder; False if it was already gone."""
    try:
        _unlink(path)
    except FileNotFoundError:
        return False
    if sync_dir:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    return True


def read_small(path: str) -> bytes:
    """A whole small file with plain system calls (cheaper than ``open()`` when
    thousands of envelopes are read at start-up or by ``queue list``)."""
    fd = _open(path, os.O_RDONLY)
    try:
        return _read_all(fd)
    finally:
        os.close(fd)


def read_small_stat(path: str) -> tuple[bytes, os.stat_result]:
    """``read_small`` plus the file's stat, from the same open (no second path lookup)."""
    fd = _open(path, os.O_RDONLY)
    try:
        return _read_all(fd), os.fstat(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT: the caller answers 452 4.3.1 rather than 451 4.3.0."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def locked(path: str, blocking: bool = True) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    With ``blocking=False`` raises BlockingIOError when another process holds it.
    The lock dies with the process, so a crash never leaves a stale lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)
