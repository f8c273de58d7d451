"""The server process returns the memory of password checks to the OS, and
keeps what start-up made out of the cyclic collector's scans."""

import gc
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from mailstack.tap import freeze_startup_heap, return_big_frees_to_the_os

PROBE = textwrap.dedent(
    """
    import sys, threading
    from mailstack.auth.userdb import _hasher
    from mailstack.tap import return_big_frees_to_the_os
    assert return_big_frees_to_the_os()
    ph = _hasher()
    h = ph.hash("x")
    def rss():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
    before = rss()
    threads = [threading.Thread(target=lambda: [ph.verify(h, "x") for _ in range(2)]) for _ in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(rss() - before)
    """
)


def growth() -> int:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    return int(out.stdout)


class MemoryTests(SynchronousTestCase):
    def setUp(self):
        if not return_big_frees_to_the_os():
            self.skipTest("no glibc mallopt here")

    def test_passwordChecksDoNotPinMemory(self):
        """With the fixed mmap threshold, 16 threads of Argon2 checks (19 MiB work
        area each) leave RSS within 40 MB of where it was.  (glibc's default dynamic
        threshold kept hundreds of MB in per-thread arenas; how much depends on the
        core count and ``MALLOC_ARENA_MAX``, so that side is not asserted.)"""
        self.assertLess(growth(), 40)


class StartupHeapTests(SynchronousTestCase):
    def test_startupObjectsLeftOutOfCollections(self):
        """An object made before ``freeze_startup_heap`` (a cycle, so only the
        cyclic collector could ever free it) is no longer among the objects a
        collection walks; one made afterwards is."""
        before: dict = {}
        before["self"] = before
        self.addCleanup(gc.unfreeze)
        freeze_startup_heap()
        after: dict = {}
        after["self"] = after
        walked = gc.get_objects()
        self.assertFalse(any(o is before for o in walked))
        self.assertTrue(any(o is after for o in walked))
