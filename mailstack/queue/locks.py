# -*- test-case-name: tests.queue.test_store -*-
"""Entry locks: saves of the running manager against ``queue delete`` and ``queue hold``.

Blocking, like ``queue/store.py``: the admin command and the manager's
threads take an exclusive ``flock`` per entry, so a deletion beside the
running server is never undone by a save, and saves of different entries
never wait for each other.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from mailstack.interfaces import IQueueStore
from mailstack.queue.entry import QueueEntry


@contextmanager
def entry_lock(store: IQueueStore, queue_id: str) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the entry's message file, or on its
    envelope when the message is inside it (blocking).

    Yields whether the entry still exists.  ``remove`` unlinks the envelope
    and then the message; done under this lock (``remove_entry``), "message
    file present" inside the lock means "not deleted".  An envelope is
    replaced (``save``) under the lock of the file it replaces, so once the
    lock is held the envelope at the path must still be that file, else the
    lock is taken again on the new one.  A lock per entry, so saves of
    different entries never wait for each other.
    """
    path = store.message_path(queue_id)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        with _envelope_lock(store.envelope_path(queue_id)) as present:
            yield present
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield os.path.exists(path)
    finally:
        os.close(fd)


@contextmanager
def _envelope_lock(path: str) -> Iterator[bool]:
    """``flock`` the envelope at ``path``, the very file the path names once locked."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                yield False
                return
            if current:
                yield True
                return
        finally:
            os.close(fd)


def save_unless_deleted(store: IQueueStore, entry: QueueEntry) -> bool:
    """Save ``entry`` unless ``queue delete`` removed it meanwhile (blocking).

    The hold is the admin command's: the one on disk is kept, so a ``queue
    hold`` during a delivery attempt is not undone by the attempt's save.
    """
    with entry_lock(store, entry.id) as present:
        if not present:
            return False
        store.save(entry, keep_hold=True)  # one read of the envelope it replaces
        return True


def remove_entry(store: IQueueStore, queue_id: str) -> bool:
    """Remove an entry under its lock (blocking; ``queue delete``).

    False if there was no envelope."""
    with entry_lock(store, queue_id):
        return store.remove(queue_id)
