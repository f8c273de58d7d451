"""A private mailstack instance for the benchmark: config, start, admin, stop.

``twistd -n --pidfile= mailstack --config <work>/mailstack/mailstack.toml`` on free
loopback ports, data in ``<work>/mailstack/data``, all outbound mail through the
counting sink (``[relay] smarthost``).  The settings are the shipped defaults except
where the benchmark needs room (connection caps, message size, no sending limit)
and plaintext logins on loopback (as Dovecot is configured for the same test).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from procmem import free_port

DOMAIN = "bench.test"


def twistd_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MAILSTACK_CONFIG", None)
    # Make the project importable however the benchmark was started.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Mailstack:
    def __init__(self, work: str, sink_port: int):
        self.root = os.path.join(work, "mailstack")
        self.data_dir = os.path.join(self.root, "data")
        self.config_path = os.path.join(self.root, "mailstack.toml")
        self.log_path = os.path.join(self.root, "twistd.log")
        self.output_path = os.path.join(self.root, "twistd.out")
        self.sink_port = sink_port
        self.ports = {"smtp": free_port(), "submission": free_port(), "pop3": free_port()}
        self.pop3_enabled = True
        # Extra config keys by section (``--features``), as TOML values.
        self.extra: dict[str, dict[str, object]] = {}
        self.process: subprocess.Popen | None = None
        os.makedirs(self.root, exist_ok=True)

    def settings(self) -> dict[str, object]:
        """The config as {key or section: value or {key: value}}, ``extra`` merged in."""
        def listen(port: int) -> list[str]:
            return [f"tcp:{port}:interface=127.0.0.1"]

        doc: dict[str, object] = {
            "hostname": f"mailstack.{DOMAIN}",
            "data_dir": self.data_dir,
            "domains": {"local": [DOMAIN]},
            "listen": {
                "smtp": listen(self.ports["smtp"]),
                "submission": listen(self.ports["submission"]),
                "submissions": [],
                "pop3": listen(self.ports["pop3"]) if self.pop3_enabled else [],
                "pop3s": [],
            },
            "smtp": {"max_message_size": 67108864, "max_connections": 2000, "max_connections_per_ip": 2000},
            "auth": {"plaintext_on_loopback": True},
            "relay": {"smarthost": f"127.0.0.1:{self.sink_port}"},
            # Throughput, not policy: no sending limits.  Features off unless
            # --features turns them on (run.py FEATURES): no DKIM signing, no
            # inbound SPF/DKIM/DMARC (they would ask this machine's resolver).
            "limits": {"messages_per_hour": 0, "messages_per_day": 0},
            "pipeline": {"checks": ["loop"]},
            "inbound": {"spf": False, "dkim": False, "dmarc": False},
        }
        for section, keys in self.extra.items():
            table = doc.setdefault(section, {})
            assert isinstance(table, dict)
            table.update(keys)
        return doc

    def write_config(self) -> None:
        import json

        # JSON strings, integers, booleans and lists of strings are TOML values too.
        doc = self.settings()
        lines = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if not isinstance(v, dict)]
        for section, keys in doc.items():
            if isinstance(keys, dict):
                lines += ["", f"[{section}]"] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 120.0) -> float:
        """Start twistd; returns the seconds until every listener accepted."""
        self.write_config()
        cmd = twistd_command() + ["--nodaemon", "--pidfile=", f"--logfile={self.log_path}", "mailstack",
                                  "--config", self.config_path]
        t0 = self.started_at = time.monotonic()
        with open(self.output_path, "ab") as out:
            self.process = subprocess.Popen(cmd, cwd=self.root, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        import socket

        waiting = {k: v for k, v in self.ports.items() if k != "pop3" or self.pop3_enabled}
        while waiting:
            if self.process.poll() is not None:
                raise RuntimeError(f"mailstack exited with {self.process.returncode} before listening: "
                                   + self.diagnostics(800))
            for name, port in list(waiting.items()):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    continue
                del waiting[name]
            if waiting:
                if time.monotonic() - t0 > timeout:
                    self.kill()
                    raise RuntimeError(
                        f"mailstack listeners {sorted(waiting)} never accepted: " + self.diagnostics(800)
                    )
                time.sleep(0.02)
        return time.monotonic() - t0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def roots(self) -> list[int]:
        return [self.pid] if self.pid else []

    def stop(self, timeout: float = 30.0) -> int | None:
        if not self.process or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def admin(self, *args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mailstack", "--config", self.config_path, *args],
                              input=input, capture_output=True, text=True, cwd=self.root, env=_env(),
                              timeout=timeout)

    def maildir(self, address: str) -> str:
        local, _, domain = address.partition("@")
        return os.path.join(self.data_dir, "mail", domain.lower(), local)

    def diagnostics(self, n: int = 3000) -> str:
        parts = []
        for path in (self.output_path, self.log_path):
            try:
                with open(path, errors="replace") as f:
                    txt = f.read()[-n:]
                if txt.strip():
                    parts.append(txt)
            except FileNotFoundError:
                pass
        return " | ".join(parts).replace("\n", " / ")

    def wipe(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def fill_queue(queue_root: str, count: int, rcpt: str = "deferred@remote.test", size: int = 4096) -> float:
    """Write ``count`` deferred entries straight into a mailstack queue (no fsync: test data).

    Uses ``mailstack.queue.store.QueueStore`` for names and ``QueueEntry`` for the
    envelope format; returns the seconds taken.  Raises ImportError if the queue
    store is not there yet.
    """
    import json

    from msggen import make_message

    from mailstack.queue.entry import QueueEntry, RecipientState
    from mailstack.queue.store import QueueStore

    t0 = time.monotonic()
    store = QueueStore(queue_root)
    store.recover()  # creates the folders
    now = time.time()
    _, data = make_message("sender@bench.test", rcpt, size, msgid="<deferred@bench.test>")
    # One message file, hard-linked under every id: committed messages are immutable,
    # and start-up and `queue list` read envelopes only.
    template = os.path.join(os.path.dirname(store.root), "deferred-template.eml")
    with open(template, "wb") as f:
        f.write(data)
    # The envelope as the project encodes it, for a placeholder id; each entry is the
    # same JSON with its own id (24 hex digits, so a plain substitution).
    placeholder = "f" * 24
    entry = QueueEntry(
        id=placeholder, sender="sender@bench.test", arrival=now - 3600, size=len(data), peer="127.0.0.1",
        recipients=[RecipientState(address=rcpt, original=rcpt, local=False, attempts=1,
                                   next_attempt=now + 86400, last_reply="451 4.4.1 benchmark: deferred",
                                   last_host="192.0.2.1")],
    )
    envelope = json.dumps(entry.to_json(), sort_keys=True, indent=1).encode()
    assert QueueEntry.from_json(json.loads(envelope)).id == placeholder
    ph = placeholder.encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(count):
        if i and i % 50000 == 0:  # ext4: at most 65,000 links per inode
            template = f"{template}.{i}"
            with open(template, "wb") as f:
                f.write(data)
        qid = store.new_id()
        os.link(template, store.message_path(qid))
        fd = os.open(store.envelope_path(qid), flags, 0o600)
        try:
            os.write(fd, envelope.replace(ph, qid.encode()))
        finally:
            os.close(fd)
    return time.monotonic() - t0
