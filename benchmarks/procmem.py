"""Process memory and helpers: PSS/RSS of a server's whole process tree, free ports.

PSS (proportional set size) is read from ``/proc/<pid>/smaps_rollup`` (Linux >= 4.14)
and summed over the server's processes, so shared pages (libc, the Python binary)
are counted once across a multi-process server like Postfix or Dovecot.
"""

from __future__ import annotations

import os
import socket
import threading
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on host:port; TimeoutError if not."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def _ppid_map() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: split after the last ')'
        rest = data[data.rfind(b")") + 2 :].split()
        out[int(name)] = int(rest[1])
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that exist right now."""
    ppids = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in ppids or pid == root:
            out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rollup(pid: int) -> dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    vals[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return vals


def pss(pids: list[int]) -> int:
    """Sum of PSS in bytes over pids (vanished ones count 0)."""
    return sum(_rollup(p).get("Pss", 0) for p in pids)


def rss(pids: list[int]) -> int:
    """Sum of RSS in bytes over pids (from /proc/<pid>/status VmRSS)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class Sampler:
    """Samples PSS and RSS of a process tree (or fixed pid list) in a thread; keeps maxima.

    ``roots`` is a callable returning the root pids each time (a server may fork).
    """

    def __init__(self, roots, interval: float = 0.1, measure_pss: bool = True):
        self.roots = roots
        self.interval = interval
        self.measure_pss = measure_pss
        self.max_pss = 0
        self.max_process_pss = 0  # the largest single process (a master and its workers: each)
        self.max_rss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> list[int]:
        pids: list[int] = []
        for r in self.roots():
            pids.extend(process_tree(r))
        return pids

    def sample(self) -> None:
        pids = self._pids()
        if self.measure_pss:
            each = [pss([p]) for p in pids]
            self.max_pss = max(self.max_pss, sum(each))
            self.max_process_pss = max(self.max_process_pss, max(each, default=0))
        self.max_rss = max(self.max_rss, rss(pids))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def tree_pss(roots: list[int]) -> int:
    pids: list[int] = []
    for r in roots:
        pids.extend(process_tree(r))
    return pss(pids)


def tree_rss(roots: list[int]) -> int:
    pids: list[int] = []
    for r in roots:
        pids.extend(process_tree(r))
    return rss(pids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, with that of its waited-for children (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    # fields after "pid (comm) ": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
    rest = data[data.rfind(b")") + 2 :].split()
    return sum(int(x) for x in rest[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds used so far by the process trees under ``roots``: steadier than a
    rate on a shared machine, as other work there slows a server but costs it no CPU."""
    return sum(cpu_seconds(p) for r in roots for p in process_tree(r))
