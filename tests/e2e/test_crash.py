"""End to end: crash safety under SIGKILL.

``test_killRoundsLoseNothing``: ten smtplib connections send a steady load to
the MX listener of a real ``twistd mailstack``: half the messages go to a local
user, half to an alias that forwards to a local user *and* a remote address
(unauthenticated forwarding is the administrator's choice, so no relay is
needed), whose mail goes through ``relay.smarthost`` to a sink that accepts
slowly.  The server is SIGKILLed at a random moment (seeded) in each of several
rounds and restarted on the same data_dir.  At the end every message that got
250 (tracked by Message-ID) is in every local Maildir it was for and at the
sink, the queue is empty and ``queue/corrupt/`` is empty.

``test_killDuringPop3Update``: SIGKILL right after QUIT in a POP3 session that
deleted half of a large mailbox; after a restart the mailbox is consistent:
every message is either there or gone (never half), no undeleted message is
gone, UIDLs are the original ones and every listed message can be retrieved.
"""

from __future__ import annotations

import email
import os
import poplib
import random
import smtplib
import threading
import time

from tests.e2e.harness import Server
from tests.e2e.sinks import Sink, message_ids_in, queue_state

ROUNDS = 3
CONNECTIONS = 10
SEED = 6

PASSWORD = "crash-pw"

def test_killRoundsLoseNothing(tmp_path) -> None:
    """Several SIGKILLs at random moments under local + remote load: every acknowledged message is
    delivered to each of its local Maildirs and to the sink; the queue and corrupt/ end empty."""
    rng = random.Random(SEED)
    sink = Sink(delay=0.05)
    server = Server(
        tmp_path,
        extra_toml=(
            f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\nretry_intervals = ["1s"]\nconnect_timeout = "5s"\n'
            '[smtp]\nshutdown_grace = "1s"\n'
        ),
    )
    try:
        for user in ("alice@localhost", "bob@localhost"):
            r = server.admin("user", "add", user, "--password-stdin", input=PASSWORD + "\n")
            assert r.returncode == 0, r.stderr
        r = server.admin("alias", "add", "fwd@localhost", "bob@localhost,carol@remote.example")
        assert r.returncode == 0, r.stderr

        acked: dict[str, str] = {}  # Message-ID -> recipient used
        lock = threading.Lock()
        counter = iter(range(10**9))

        for round_no in range(ROUNDS):
            server.start()
            stop = threading.Event()

            def sender(n: int, stop: threading.Event = stop, round_no: int = round_no) -> None:
                try:
                    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=20) as c:
                        c.ehlo("load.test")
                        while not stop.is_set():
                            with lock:
                                i = next(counter)
                            rcpt = "alice@localhost" if i % 2 else "fwd@localhost"
                            mid = f"<crash-{round_no}-{n}-{i}@load.test>"
                            body = f"Message-ID: {mid}\r\nSubject: crash {i}\r\n\r\n" + "line of load\r\n" * 30
                            c.sendmail("load@remote.example", [rcpt], body)
                            with lock:  # sendmail returned: the 250 came back
                                acked[mid] = rcpt
                except (OSError, smtplib.SMTPException):
                    pass  # the server died under us

            threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(CONNECTIONS)]
            before = len(acked)
            for t in threads:
                t.start()
            # Kill at a random moment once the load is flowing.
            deadline = time.monotonic() + 30
            while len(acked) - before < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))
            server.kill()
            stop.set()
            for t in threads:
                t.join(30)
            assert len(acked) - before >= 20, f"round {round_no}: load did not flow\n{server.diagnostics()}"

        server.start()
        local_expect = {"alice@localhost": set(), "bob@localhost": set()}
        remote_expect = set()
        for mid, rcpt in acked.items():
            if rcpt == "alice@localhost":
                local_expect["alice@localhost"].add(mid)
            else:
                local_expect["bob@localhost"].add(mid)
                remote_expect.add(mid)

        def missing() -> dict[str, set[str]]:
            out = {u: want - set(message_ids_in(server.maildir(u))) for u, want in local_expect.items()}
            at_sink = set()
            for _, rcpts, data in sink.snapshot():
                msg = email.message_from_bytes(data)
                if rcpts == ["carol@remote.example"] and msg["Message-ID"]:
                    at_sink.add(msg["Message-ID"].strip())
            out["sink"] = remote_expect - at_sink
            return out

        deadline = time.monotonic() + 60
        while (any(missing().values()) or queue_state(server)) and time.monotonic() < deadline:
            time.sleep(0.5)
        lost = {k: sorted(v)[:5] for k, v in missing().items() if v}
        assert not lost, f"acknowledged messages lost ({len(acked)} acked): {lost}\n{server.diagnostics()}"
        assert queue_state(server) == []
        corrupt = os.path.join(server.data_dir, "queue", "corrupt")
        assert not os.path.isdir(corrupt) or os.listdir(corrupt) == []
        server.stop()
        ids = {u: message_ids_in(server.maildir(u)) for u in local_expect}
        dupes = sum(len(found) - len(set(found)) for found in ids.values())
        print(f"crash rounds: {len(acked)} acknowledged, {len(sink.snapshot())} at the sink, {dupes} local duplicates")
        assert len(acked) >= 100, len(acked)
    finally:
        server.kill()
        sink.close()

def _pop3(server: Server) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    p.user("alice@localhost")
    p.pass_(PASSWORD)
    return p

def _fill(maildir: str, n: int) -> None:
    """Write n small messages straight into the Maildir (as a deliverer would: tmp, then new)."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    for i in range(n):
        name = f"1700000000.M{i}P1Q{i}.fill,S=40"
        with open(os.path.join(maildir, "tmp", name), "wb") as f:
            f.write(b"Subject: m%d\r\n\r\nbody of message %d\r\n" % (i, i))
        os.rename(os.path.join(maildir, "tmp", name), os.path.join(maildir, "new", name))

def test_killDuringPop3Update(tmp_path) -> None:
    """SIGKILL right after QUIT (during UPDATE) at several delays: after a restart, every message is
    either present and retrievable or gone, only messages marked deleted are gone, UIDLs are unchanged
    and the listing matches the files."""
    server = Server(tmp_path, extra_toml="[auth]\nplaintext_on_loopback = true\n")
    try:
        r = server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        maildir = server.maildir("alice@localhost")
        _fill(maildir, 3000)
        server.start()
        for delay in (0.0, 0.005, 0.02, 0.05):
            p = _pop3(server)
            before = dict(line.decode().split() for line in p.uidl()[1])  # number -> uidl
            doomed = {u for n, u in before.items() if int(n) % 2 == 0}
            for n in before:
                if int(n) % 2 == 0:
                    p.dele(int(n))
            p.sock.sendall(b"QUIT\r\n")
            time.sleep(delay)
            server.kill()
            p.close()

            server.start()
            p = _pop3(server)
            after = dict(line.decode().split() for line in p.uidl()[1])
            survivors = set(after.values())
            print(f"kill {delay}s after QUIT: {len(before)} -> {len(after)} messages ({len(doomed)} marked)")
            assert survivors <= set(before.values()), "UIDLs changed or appeared"
            assert set(before.values()) - doomed <= survivors, "an undeleted message is gone"
            files = [n for sub in ("new", "cur") for n in os.listdir(os.path.join(maildir, sub))]
            assert len(files) == len(after), (len(files), len(after))
            count, _ = p.stat()
            assert count == len(after)
            for n in list(after)[:: max(1, len(after) // 50)]:
                resp, lines, _ = p.retr(int(n))
                assert resp.startswith(b"+OK") and lines[0].startswith(b"Subject: m")
            p.quit()  # nothing deleted: the next round starts from this state
        server.stop()
    finally:
        server.kill()


def test_sigtermRightAfterStartIsGraceful(tmp_path) -> None:
    """SIGTERM the moment the listeners accept (before twistd's reactor has started) is still a
    graceful stop: exit status 0, never death by the signal.  Repeated, since it is a race."""
    server = Server(tmp_path)
    try:
        for _ in range(6):
            server.start()
            server.stop()  # asserts exit status 0
    finally:
        server.kill()
