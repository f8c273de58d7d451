"""End to end: SIGKILL during an SMTP load loses no message that got 250."""

from __future__ import annotations

import smtplib
import threading
import time

from tests.e2e.harness import Server
from tests.e2e.sinks import maildir_messages

CONNECTIONS = 10
PER_CONNECTION = 50  # 500 messages in all
KILL_AFTER = 150  # acknowledged messages before the SIGKILL


def delivered_markers(server: Server, address: str) -> set[str]:
    """Subjects of every message in the user's Maildir (new/ and cur/)."""
    found = set()
    for data in maildir_messages(server.maildir(address)):
        for line in data.split(b"\r\n"):
            if line.startswith(b"Subject: crash-"):
                found.add(line[len(b"Subject: ") :].decode())
    return found


def test_sigkillUnderLoadLosesNoAcceptedMessage(tmp_path):
    """10 connections send 500 messages over MX; the server is SIGKILLed mid-load and restarted;
    every message that got 250 ends up in the Maildir (at least once)."""
    server = Server(tmp_path)
    try:
        r = server.admin("user", "add", "alice@localhost", "--password-stdin", input="pw\n")
        assert r.returncode == 0, r.stderr
        server.start()
        acked: set[str] = set()
        lock = threading.Lock()
        enough = threading.Event()

        def sender(n: int) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as c:
                    c.ehlo("load.test")
                    for i in range(PER_CONNECTION):
                        marker = f"crash-{n}-{i}"
                        body = f"Subject: {marker}\r\n\r\n" + "load line\r\n" * 20
                        c.sendmail("load@remote.test", ["alice@localhost"], body)
                        with lock:  # sendmail returned: the 250 came back
                            acked.add(marker)
                            if len(acked) >= KILL_AFTER:
                                enough.set()
            except (OSError, smtplib.SMTPException):
                pass  # the server died under us: expected

        threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(CONNECTIONS)]
        for t in threads:
            t.start()
        assert enough.wait(120), f"only {len(acked)} messages acknowledged\n{server.diagnostics()}"
        server.kill()
        for t in threads:
            t.join(60)
        with lock:
            accepted = set(acked)
        assert len(accepted) >= KILL_AFTER

        server.start()  # recovery redelivers what the crash left in the queue
        deadline = time.monotonic() + 120
        missing = accepted - delivered_markers(server, "alice@localhost")
        while missing and time.monotonic() < deadline:
            time.sleep(0.2)
            missing = accepted - delivered_markers(server, "alice@localhost")
        lost = f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
        assert not missing, f"{lost}\n{server.diagnostics()}"
        server.stop()
    finally:
        server.kill()
