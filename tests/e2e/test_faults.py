"""End to end: resource faults against a real ``twistd mailstack``.

* Disk full: data_dir on a small tmpfs the test mounts (root only; skipped
  with the reason otherwise).  Filling it makes DATA answer 452 4.3.1 with
  nothing acknowledged, the server keeps answering, and once the tmpfs is
  grown again mail is accepted and everything acknowledged is delivered.
* Damaged queue entries (garbage, truncated, wrong shape or wrong types, in
  ``queue/env/``) are moved to ``queue/corrupt/`` and logged; the queue
  manager keeps delivering the healthy entries and new mail.

DNS failures and stalling MX hosts are covered at unit level in
``tests/hostile/test_outbound_faults.py`` (and tests/test_mx.py).
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import time

import pytest

from tests.e2e.harness import Server
from tests.e2e.sinks import message_ids_in, queue_state

PASSWORD = "faults-pw"


def _mount_tmpfs(path: str, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; None on success, else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True)
    if r.returncode != 0:
        return f"mount -t tmpfs not permitted here: {r.stderr.strip()}"
    return None


def _resize(path: str, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True)


def _umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True)


def _send(port: int, mid: str, size: int) -> tuple[int, bytes]:
    """One message of about ``size`` bytes to alice; (code, text) of the final reply."""
    body = f"Message-ID: {mid}\r\nSubject: fill\r\n\r\n".encode() + (b"x" * 998 + b"\r\n") * (size // 1000)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("fill.test")
        c.mail("fill@remote.example")
        c.rcpt("alice@localhost")
        return c.data(body)


def test_diskFull(tmp_path) -> None:
    """With data_dir full, DATA gets 452 4.3.1 and that message is nowhere; the server still answers
    (NOOP, new sessions); when space returns, new mail gets 250 and every acknowledged message is
    delivered, with nothing left in the queue, queue/tmp or queue/corrupt."""
    data_dir = os.path.join(str(tmp_path), "data")
    why = _mount_tmpfs(data_dir, "3m")
    if why:
        pytest.skip(why)
    server = Server(tmp_path, extra_toml='[relay]\nretry_intervals = ["1s"]\n')
    try:
        r = server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        server.start()
        acked, refused = [], []
        for i in range(40):  # 40 x 200 kB cannot fit in 3 MB twice over (queue + Maildir)
            mid = f"<fill-{i}@test>"
            code, text = _send(server.ports["smtp"], mid, 200_000)
            if code == 250:
                acked.append(mid)
                continue
            refused.append(mid)
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
            if len(refused) >= 3:
                break
        assert refused, "the disk never filled up"
        # Still serving while full.
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as c:
            assert c.noop()[0] == 250
            c.ehlo("x")
            assert c.mail("a@remote.example")[0] == 250
        assert server.running

        _resize(data_dir, "64m")
        code, _ = _send(server.ports["smtp"], "<after-space@test>", 200_000)
        assert code == 250
        acked.append("<after-space@test>")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = set(message_ids_in(server.maildir("alice@localhost")))
            if set(acked) <= got and not queue_state(server):
                break
            time.sleep(0.5)
        got = message_ids_in(server.maildir("alice@localhost"))
        assert set(acked) <= set(got), sorted(set(acked) - set(got))[:5]
        assert not set(refused) & set(got), "a refused message was delivered"
        assert queue_state(server) == []
        for sub in ("tmp", "corrupt"):
            d = os.path.join(data_dir, "queue", sub)
            assert not os.path.isdir(d) or os.listdir(d) == [], (sub, os.listdir(d))
        server.stop()
    finally:
        server.kill()
        _umount(data_dir)


GOOD_ID = "0000000000000a0000000001"


def _entry(qid: str, **over) -> dict:
    e = {
        "id": qid, "sender": "s@remote.example", "arrival": time.time() - 10, "size": 10, "user": "", "peer": "",
        "delay_warned": False, "version": 1,
        "recipients": [{"address": "alice@localhost", "original": "alice@localhost", "local": True,
                        "status": "pending", "attempts": 0, "next_attempt": 0.0, "last_reply": "", "last_host": "",
                        "notified": False, "history": []}],
    }
    e.update(over)
    return e


def _bad_entries() -> dict[str, bytes]:
    """id -> envelope bytes, each damaged in a different way."""
    ids = [f"0000000000000b00000000{i:02x}" for i in range(12)]
    rcpt = _entry("x")["recipients"][0]
    bad = [
        b"",  # empty (a crash before the first write)
        b'{"id": "' + ids[1].encode() + b'", "sender": "s@remote.ex',  # truncated
        os.urandom(300),  # random bytes
        b"\x00" * 64,  # zeroed block
        json.dumps([1, 2, 3]).encode(),  # wrong shape
        json.dumps(_entry(ids[5], version=99)).encode(),  # unknown version
        json.dumps(_entry("0000000000000c0000000000")).encode(),  # names another id
        json.dumps(_entry(ids[7], recipients="alice@localhost")).encode(),  # wrong type
        json.dumps(_entry(ids[8], recipients=[dict(rcpt, next_attempt="soon")])).encode(),  # wrong field type
        json.dumps(_entry(ids[9], arrival="yesterday")).encode(),
        json.dumps(_entry(ids[10], recipients=[dict(rcpt, address=5)])).encode(),
        json.dumps(_entry(ids[11], recipients=[dict(rcpt, bogus=1)])).encode(),
    ]
    return dict(zip(ids, bad, strict=True))


def test_damagedQueueEntries(tmp_path) -> None:
    """Damaged envelopes in queue/env/ at start: each is moved to queue/corrupt/ (with its message)
    and logged; the healthy entry next to them is delivered, and new mail still flows."""
    server = Server(tmp_path, extra_toml='[relay]\nretry_intervals = ["1s"]\n')
    try:
        r = server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        server.start()
        server.stop()
        q = os.path.join(server.data_dir, "queue")
        bad = _bad_entries()
        for qid, data in bad.items():
            with open(os.path.join(q, "env", qid + ".json"), "wb") as f:
                f.write(data)
            with open(os.path.join(q, "msg", qid), "wb") as f:
                f.write(b"Message-ID: <bad-" + qid.encode() + b"@test>\r\n\r\nbad\r\n")
        with open(os.path.join(q, "env", GOOD_ID + ".json"), "w") as f:
            json.dump(_entry(GOOD_ID), f)
        with open(os.path.join(q, "msg", GOOD_ID), "wb") as f:
            f.write(b"Message-ID: <healthy@test>\r\nSubject: healthy\r\n\r\nstill delivered\r\n")

        listing = server.admin("queue", "list", "--json")
        assert listing.returncode == 0, listing.stderr  # the admin command copes too

        server.start()
        code, _ = _send(server.ports["smtp"], "<new-after-damage@test>", 2000)
        assert code == 250
        deadline = time.monotonic() + 30
        want = {"<healthy@test>", "<new-after-damage@test>"}
        while time.monotonic() < deadline and not want <= set(message_ids_in(server.maildir("alice@localhost"))):
            time.sleep(0.3)
        got = set(message_ids_in(server.maildir("alice@localhost")))
        assert want <= got, (got, server.diagnostics())
        assert not any(m.startswith("<bad-") for m in got), got
        corrupt = set(os.listdir(os.path.join(q, "corrupt")))
        for qid in bad:
            assert qid + ".json" in corrupt, (qid, sorted(corrupt), server.diagnostics())
        assert os.listdir(os.path.join(q, "env")) == [] or queue_state(server) == []
        log = server.log()
        assert "Traceback" not in log, server.diagnostics()
        assert server.running
        server.stop()
    finally:
        server.kill()
