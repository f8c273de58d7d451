"""Run the real server (``twistd -n mailstack``) and admin command in subprocesses.

End-to-end tests use this and real clients (``smtplib``, ``poplib``, sockets)::

    server = Server(tmp_path, extra_toml='[smtp]\\nmax_recipients = 3\\n')
    server.start()                      # returns once every listener accepts
    smtplib.SMTP("127.0.0.1", server.ports["smtp"])
    server.admin("user", "add", "alice@localhost", "--password-stdin", input="pw\\n")
    server.stop()                       # SIGTERM; asserts exit status 0

The config is written to ``tmp_path/mailstack.toml`` with ``data_dir =
tmp_path/data`` and each of the five listeners on a free loopback port
(``ssl:`` for submissions and pop3s).  ``extra_toml`` is merged over that (a
table in it replaces single keys, so ``[listen]\\npop3 = []`` turns POP3 off and
``hostname = "mx.test"`` works too).  ``python_path`` puts folders in front of
the server's ``PYTHONPATH`` (a folder holding ``mailstack/plugins/<check>.py``
adds a check plugin).  twistd's log goes to ``server.log_path``;
its stdout and stderr to ``server.output_path``; both are in the failure message
when the server does not come up.

``$MAILSTACK_TEST_PROCESSES`` sets ``[server] processes`` for every server
whose ``extra_toml`` does not (CI runs the end-to-end tests with the default,
"auto", and again with 1).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from typing import Any

from mailstack.address import mailbox_components, parse_address

LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s")
_TLS_LISTENERS = ("submissions", "pop3s")

START_TIMEOUT = 60.0  # the CI machine is small and shared
STOP_TIMEOUT = 30.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    found = _state_and_parent(pid)
    return found is not None and found[0] != "Z"


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s live child processes."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := _state_and_parent(int(name))) and info[1] == pid and info[0] != "Z":
            found.append(int(name))
    return sorted(found)


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def twistd_command() -> list[str]:
    """The ``twistd`` of this interpreter (works in a venv without activating it)."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a mailstack config: scalars, then tables (nested ones as ``[a.b]``)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"\n[{prefix}{name}]")
            lines.append(dump_toml(table, f"{prefix}{name}.").rstrip("\n"))
    return "\n".join(lines) + "\n"


def _read_from(path: str, offset: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return f.read()


def _clean_env(python_path: tuple[str, ...] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MAILSTACK_CONFIG", None)
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join([*python_path, *filter(None, [env.get("PYTHONPATH")])])
    return env


class Server:
    """One mailstack server process with its own config, data and ports."""

    def __init__(self, tmp_path: Any, extra_toml: str = "", python_path: tuple[str, ...] = ()) -> None:
        self.root = str(tmp_path)
        self.python_path = tuple(python_path)
        self.data_dir = os.path.join(self.root, "data")
        self.config_path = os.path.join(self.root, "mailstack.toml")
        self.log_path = os.path.join(self.root, "twistd.log")
        self.output_path = os.path.join(self.root, "twistd.out")
        self.ports = dict(zip(LISTENERS, free_ports(len(LISTENERS)), strict=True))
        doc: dict[str, Any] = {
            "hostname": "localhost",
            "data_dir": self.data_dir,
            "domains": {"local": ["localhost"]},
            "listen": {name: [self._listener(name, port)] for name, port in self.ports.items()},
            "auth": {"failure_delay": "10ms", "max_failure_delay": "50ms"},
        }
        processes = os.environ.get("MAILSTACK_TEST_PROCESSES")
        if processes:
            doc["server"] = {"processes": processes if processes == "auto" else int(processes)}
        for key, value in tomllib.loads(extra_toml).items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key].update(value)
            else:
                doc[key] = value
        self._doc = doc
        # Listeners turned off (or set) by extra_toml are not ours to wait for or move.
        self.ports = {
            name: port for name, port in self.ports.items() if doc["listen"].get(name) == [self._listener(name, port)]
        }
        self._write_config()
        self.process: subprocess.Popen | None = None

    @staticmethod
    def _listener(name: str, port: int) -> str:
        return f"{'ssl' if name in _TLS_LISTENERS else 'tcp'}:{port}:interface=127.0.0.1"

    def _write_config(self) -> None:
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(dump_toml(self._doc))

    def _move_ports(self) -> None:
        """Another process took a port between free_ports() and the bind: pick new ones."""
        self.ports = dict(zip(self.ports, free_ports(len(self.ports)), strict=True))
        for name, port in self.ports.items():
            self._doc["listen"][name] = [self._listener(name, port)]
        self._write_config()

    # -- process control ----------------------------------------------------

    def command(self) -> list[str]:
        return twistd_command() + [
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.log_path}",
            "mailstack",
            "--config",
            self.config_path,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start twistd and return once every configured listener accepts.

        Ready means: the process runs, every listener port accepts, and the log
        of this run says each listener is ours ("listening on"), so a port taken
        by another process on a shared machine is never mistaken for ours.  If a
        port was taken before we could bind it, new ports are picked (at most
        twice); read ``server.ports`` after ``start()``.
        """
        assert self.process is None or self.process.poll() is not None, "already running"
        for attempt in range(3):
            if self._start_once(timeout):
                return
            if attempt < 2 and "cannot listen on" in self.diagnostics() and self.ports:
                self._move_ports()
                continue
            raise AssertionError(f"twistd exited with {self.process.returncode} before listening\n{self.diagnostics()}")

    def _start_once(self, timeout: float) -> bool:
        log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.output_path, "ab") as out:
            self.process = subprocess.Popen(
                self.command(), cwd=self.root, env=_clean_env(self.python_path), stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        waiting = dict(self.ports)
        expected = sum(len(v) for v in self._doc["listen"].values())
        while True:
            if self.process.poll() is not None:
                return False
            for name, port in list(waiting.items()):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    continue
                del waiting[name]
            if not waiting and self._log_since(log_offset).count(" listening on ") >= expected:
                return True
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"listeners {sorted(waiting)} never accepted\n{self.diagnostics()}")
            time.sleep(0.05)

    def _log_since(self, offset: int) -> str:
        """The log written since ``offset``, across one rotation by twistd (at 1 MB
        the file becomes ``<log>.1`` and a new one starts)."""
        try:
            if os.path.getsize(self.log_path) >= offset:
                return _read_from(self.log_path, offset)
            return _read_from(self.log_path + ".1", offset) + _read_from(self.log_path, 0)
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM; waits for the exit and asserts status 0.  Returns the status."""
        assert self.process is not None, "not started"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"twistd did not exit {timeout}s after SIGTERM\n{self.diagnostics()}") from None
        assert status == 0, f"twistd exited with {status}\n{self.diagnostics()}"
        return status

    def kill(self) -> None:
        """SIGKILL, as a crash would; no cleanup runs in the server."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def workers(self) -> list[int]:
        """The pids of the server's session workers (its child processes)."""
        assert self.process is not None, "not started"
        return children(self.process.pid)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def diagnostics(self) -> str:
        """The tail of twistd's log and output, for failure messages."""
        parts = []
        for path in (self.output_path, self.log_path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    parts.append(f"--- {path}\n{f.read()[-6000:]}")
            except FileNotFoundError:
                pass
        return "\n".join(parts)

    def log(self) -> str:
        """Everything twistd logged so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The log once the regular expression ``pattern`` matches in it: a line
        can land after the reply that follows it (a session worker's lines reach
        the log through the master, and every log is written once per reactor turn)."""

        def matched() -> str:
            log = self.log()
            return log if re.search(pattern, log) else ""

        return wait_until(matched, timeout, repr(pattern))

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()

    def shut_down(self) -> None:
        """``stop()`` (graceful, asserting exit status 0), and in any case ``kill()``."""
        try:
            self.stop()
        finally:
            self.kill()

    def add_users(self, users: dict[str, str]) -> None:
        """``mailstack user add`` each address with its password; asserts success."""
        for address, password in users.items():
            r = self.admin("user", "add", address, "--password-stdin", input=password + "\n")
            assert r.returncode == 0, r.stderr

    # -- helpers --------------------------------------------------------------

    def admin(self, *args: str, input: str | bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``mailstack --config <this config> *args``; never raises on exit status."""
        return subprocess.run(
            [sys.executable, "-m", "mailstack", "--config", self.config_path, *args],
            input=input,
            capture_output=True,
            text=not isinstance(input, bytes),
            cwd=self.root,
            env=_clean_env(self.python_path),
            timeout=timeout,
        )

    def maildir(self, address: str) -> str:
        """The Maildir folder of a local user (it may not exist yet)."""
        domain, local = mailbox_components(parse_address(address))
        return os.path.join(self.data_dir, "mail", domain, local)
