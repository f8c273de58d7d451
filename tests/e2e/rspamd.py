"""A private rspamd (Debian package ``rspamd``) for end-to-end tests.

``Rspamd(tmp_path).start()`` runs ``rspamd -f`` (no fork, no daemon) with the
packaged rules in /etc/rspamd and everything it writes under ``tmp_path``:
the normal worker (the HTTP ``/checkv2`` API) on a free loopback port, the
controller, proxy (milter) and fuzzy workers off, no Redis (the modules that
need it switch themselves off), DNS sent to ``nameserver`` (by default a
loopback port where nothing answers, so no query leaves the machine; pass the
fake DNS server's address to give rspamd answers), and the log in
``tmp_path/log/rspamd.log``.  The packaged rules answer the GTUBE test string
with the action ``reject``.

``available()`` is False when rspamd is not installed; tests skip then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from tests.e2e.harness import free_ports

RSPAMD = "/usr/bin/rspamd"
CONFDIR = "/etc/rspamd"
START_TIMEOUT = 60.0

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def available() -> bool:
    """Whether the rspamd binary and its packaged configuration are installed."""
    return os.access(RSPAMD, os.X_OK) and os.path.exists(os.path.join(CONFDIR, "rspamd.conf"))


def write_config(root: str, port: int, nameserver: str) -> list[str]:
    """Write the overrides under ``root``; return the rspamd command line."""
    override = os.path.join(root, "override.d")
    for sub in ("override.d", "local.d", "db", "run", "log"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    files = {
        "worker-normal.inc": f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n',
        "worker-controller.inc": "enabled = false;\n",
        "worker-proxy.inc": "enabled = false;\n",
        "worker-fuzzy.inc": "enabled = false;\ncount = -1;\n",
        "logging.inc": f'type = "file";\nfilename = "{root}/log/rspamd.log";\nlevel = "notice";\n',
        "options.inc": (
            "dns {\n"
            f'  nameserver = ["{nameserver}"];\n'
            "  timeout = 1s;\n"
            "  retransmits = 1;\n"
            "}\n"
        ),
    }
    for name, text in files.items():
        with open(os.path.join(override, name), "w") as f:
            f.write(text)
    variables = {
        "CONFDIR": CONFDIR,
        "LOCAL_CONFDIR": root,
        "DBDIR": os.path.join(root, "db"),
        "RUNDIR": os.path.join(root, "run"),
        "LOGDIR": os.path.join(root, "log"),
    }
    argv = [RSPAMD, "-f", "-c", os.path.join(CONFDIR, "rspamd.conf")]
    for name, value in variables.items():
        argv += ["--var", f"{name}={value}"]
    if os.geteuid() == 0:
        # As root rspamd wants a user to drop to; -i lets it keep running as
        # root inside the throwaway test directory.
        argv += ["-u", "root", "-g", "root", "-i"]
    return argv


class Rspamd:
    """One private rspamd process; ``url`` is its HTTP base URL once started."""

    def __init__(self, tmp_path: Any, nameserver: str = "") -> None:
        self.root = os.path.join(str(tmp_path), "rspamd")
        self.port = free_ports(1)[0]
        self.nameserver = nameserver or f"127.0.0.1:{free_ports(1)[0]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "log", "rspamd.log")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start rspamd and return once ``/ping`` answers."""
        argv = write_config(self.root, self.port, self.nameserver)
        with open(os.path.join(self.root, "output.txt"), "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited with {self.proc.returncode}:\n{self.diagnostics()}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"rspamd did not answer within {timeout}s:\n{self.diagnostics()}")

    def stop(self) -> None:
        """SIGTERM the process group (rspamd forks its workers), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def diagnostics(self) -> str:
        parts = []
        for path in (os.path.join(self.root, "output.txt"), self.log_path):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {path}\n{f.read()[-4000:]}")
        return "\n".join(parts)

