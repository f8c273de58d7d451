"""fsutil: atomic replacement, durable directories, unlink, disk-full and locks."""

from __future__ import annotations

import errno
import os

from twisted.trial.unittest import SynchronousTestCase

from mailstack.storage import fsutil
from tests.storage.faults import Faults, count_steps, scratch_path


class WriteAtomicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = scratch_path(self)
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "file.json")

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_createsAndReplaces(self) -> None:
        """write_atomic creates a file and replaces it whole; no temporary remains."""
        fsutil.write_atomic(self.path, b"one")
        fsutil.write_atomic(self.path, [b"tw", b"o"])
        self.assertEqual(self.read(), b"two")
        self.assertEqual(os.listdir(self.dir), ["file.json"])

    def test_mode(self) -> None:
        """New files are private (0600) unless told otherwise."""
        fsutil.write_atomic(self.path, b"x")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_steps(self) -> None:
        """tmp open, write, fsync, rename, then the directory fsync."""
        calls = count_steps(self, lambda: fsutil.write_atomic(self.path, b"x"))
        self.assertEqual(calls, ["_open", "_write", "_fsync", "_rename", "_open", "_fsync"])

    def test_noDirSync(self) -> None:
        """sync_dir=False skips the directory fsync (the caller batches it)."""
        calls = count_steps(self, lambda: fsutil.write_atomic(self.path, b"x", sync_dir=False))
        self.assertEqual(calls, ["_open", "_write", "_fsync", "_rename"])

    def test_failureAtEveryStepKeepsOldContent(self) -> None:
        """A failure before the rename leaves the old file and no temporary."""
        fsutil.write_atomic(self.path, b"old")
        for k in range(1, 5):  # open, write, fsync, rename
            faults = Faults(self, fail_at=k)
            self.assertRaises(OSError, fsutil.write_atomic, self.path, b"new")
            faults.restore()
            self.assertEqual(self.read(), b"old", f"step {k}")
            self.assertEqual(os.listdir(self.dir), ["file.json"], f"step {k}")

    def test_failureAfterRenameHasNewContent(self) -> None:
        """If only the directory fsync fails, the new content is in place, whole."""
        fsutil.write_atomic(self.path, b"old")
        Faults(self, fail_at=6)
        self.assertRaises(OSError, fsutil.write_atomic, self.path, b"new")
        self.assertEqual(self.read(), b"new")


class WriteFdTests(SynchronousTestCase):
    def test_shortWrites(self) -> None:
        """write_fd loops until os.write has taken every byte."""
        written = []

        def short_write(fd: int, data: memoryview) -> int:
            written.append(bytes(data[:3]))
            return min(3, len(data))

        self.patch(fsutil, "_write", short_write)
        fsutil.write_fd(0, b"abcdefgh")
        self.assertEqual(b"".join(written), b"abcdefgh")


class DirectoryTests(SynchronousTestCase):
    def test_ensureDirCreatesParents(self) -> None:
        """ensure_dir makes missing parents, private, and fsyncs each changed parent."""
        base = scratch_path(self)
        os.mkdir(base)
        target = os.path.join(base, "a", "b")
        calls = count_steps(self, lambda: fsutil.ensure_dir(target))
        self.assertTrue(os.path.isdir(target))
        self.assertEqual(os.stat(target).st_mode & 0o777, 0o700)
        self.assertEqual(calls, ["_open", "_fsync"] * 2)

    def test_ensureDirLosingRaceStillSyncs(self) -> None:
        """If another thread creates the directory first, the parent is still fsynced before returning."""
        base = scratch_path(self)
        os.mkdir(base)
        target = os.path.join(base, "box")
        real_mkdir = os.mkdir

        def racing_mkdir(path, mode=0o777):
            real_mkdir(path, mode)
            raise FileExistsError(path)

        self.patch(os, "mkdir", racing_mkdir)
        calls = count_steps(self, lambda: fsutil.ensure_dir(target))
        self.assertEqual(calls, ["_open", "_fsync"])

    def test_ensureDirExisting(self) -> None:
        """An existing directory costs no system call beyond a stat."""
        base = scratch_path(self)
        os.mkdir(base)
        self.assertEqual(count_steps(self, lambda: fsutil.ensure_dir(base)), [])

    def test_fsyncDir(self) -> None:
        """fsync_dir opens the directory read-only and fsyncs it."""
        base = scratch_path(self)
        os.mkdir(base)
        self.assertEqual(count_steps(self, lambda: fsutil.fsync_dir(base)), ["_open", "_fsync"])

    def test_fsyncDirClosesOnError(self) -> None:
        """A failing fsync does not leak the directory descriptor."""
        base = scratch_path(self)
        os.mkdir(base)
        before = len(os.listdir("/proc/self/fd"))
        Faults(self, fail_at=2)
        self.assertRaises(OSError, fsutil.fsync_dir, base)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)


class UnlinkTests(SynchronousTestCase):
    def test_unlinkDurable(self) -> None:
        """unlink_durable removes the file and says whether it was there."""
        path = scratch_path(self)
        with open(path, "wb"):
            pass
        self.assertTrue(fsutil.unlink_durable(path))
        self.assertFalse(os.path.exists(path))
        self.assertFalse(fsutil.unlink_durable(path))

    def test_unlinkWithoutDirSync(self) -> None:
        """sync_dir=False removes the file with a single unlink call."""
        path = scratch_path(self)
        with open(path, "wb"):
            pass
        self.assertEqual(count_steps(self, lambda: fsutil.unlink_durable(path, sync_dir=False)), ["_unlink"])


class DiskFullTests(SynchronousTestCase):
    def test_isDiskFull(self) -> None:
        """ENOSPC and EDQUOT are a full disk; other errors and non-OSErrors are not."""
        self.assertTrue(fsutil.is_disk_full(OSError(errno.ENOSPC, "full")))
        self.assertTrue(fsutil.is_disk_full(OSError(errno.EDQUOT, "quota")))
        self.assertFalse(fsutil.is_disk_full(OSError(errno.EIO, "io")))
        self.assertFalse(fsutil.is_disk_full(ValueError("x")))


class LockTests(SynchronousTestCase):
    def test_lockedExcludes(self) -> None:
        """While one holder has the lock a non-blocking attempt fails; afterwards it works."""
        path = scratch_path(self)
        with fsutil.locked(path):
            with self.assertRaises(BlockingIOError):
                with fsutil.locked(path, blocking=False):
                    pass
        with fsutil.locked(path, blocking=False):
            pass


class ReadSmallTests(SynchronousTestCase):
    def test_readsWholeFile(self):
        """read_small returns every byte, also past its 64 KiB read size."""
        path = scratch_path(self)
        data = bytes(range(256)) * 1000
        with open(path, "wb") as f:
            f.write(data)
        self.assertEqual(fsutil.read_small(path), data)
