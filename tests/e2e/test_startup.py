"""End to end: the real twistd process starts, listens, and stops cleanly."""

import os
import socket
import ssl
import subprocess
import sys
import time

from tests.e2e.harness import Server, twistd_command


def test_allListenersAcceptAndSigtermExitsZero(tmp_path):
    """All five listeners accept, data_dir holds a generated certificate, and
    SIGTERM ends the process with status 0 within a few seconds."""
    server = Server(tmp_path)
    try:
        server.start()
        for kind in ("smtp", "submission", "pop3"):
            with socket.create_connection(("127.0.0.1", server.ports[kind]), timeout=10) as s:
                assert s.recv(100)[:1] in (b"2", b"4", b"+", b"-")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for kind in ("submissions", "pop3s"):
            with socket.create_connection(("127.0.0.1", server.ports[kind]), timeout=10) as raw:
                with context.wrap_socket(raw) as s:
                    assert s.version() in ("TLSv1.2", "TLSv1.3")
                    assert s.recv(100)
        assert os.path.exists(os.path.join(server.data_dir, "tls", "selfsigned.pem"))
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 10
    finally:
        server.kill()


def test_defaultsWithoutConfig(tmp_path):
    """With no config file the server makes ./mailstack-data and its certificate.

    The certificate is made before binding, so this holds even when the default
    ports are taken on a shared machine; the process is killed right after."""
    proc = subprocess.Popen(
        twistd_command() + ["--nodaemon", "--pidfile=", f"--logfile={tmp_path}/twistd.log", "mailstack"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "MAILSTACK_CONFIG"},
    )
    try:
        cert = tmp_path / "mailstack-data" / "tls" / "selfsigned.pem"
        deadline = time.monotonic() + 60
        while not cert.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert cert.exists()
    finally:
        proc.kill()
        proc.wait()


def test_twistdHelpListsMailstack():
    """`twistd --help` lists the mailstack plugin (the packaging trap)."""
    out = subprocess.run(twistd_command() + ["--help"], capture_output=True, text=True, timeout=60)
    assert "mailstack" in out.stdout


def test_pluginHelpListsOptions():
    """`twistd mailstack --help` shows the --config option."""
    out = subprocess.run(twistd_command() + ["mailstack", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "--config" in out.stdout


def _bad_start(tmp_path, text):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    out = subprocess.run(
        twistd_command() + ["--nodaemon", "--pidfile=", "mailstack", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    return cfg, out


def test_unknownKeyOneLine(tmp_path):
    """An unknown key exits non-zero with one line naming the key and the file."""
    cfg, out = _bad_start(tmp_path, "[relay]\nbogus = 1\n")
    assert out.returncode != 0
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "relay.bogus" in lines[0] and str(cfg) in lines[0]


def test_badDurationOneLine(tmp_path):
    """max_queue_lifetime = "5 parsecs" exits non-zero with one line naming key and file."""
    cfg, out = _bad_start(tmp_path, '[relay]\nmax_queue_lifetime = "5 parsecs"\n')
    assert out.returncode != 0
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "relay.max_queue_lifetime" in lines[0] and str(cfg) in lines[0]


def test_missingConfigFile(tmp_path):
    """A --config that does not exist is one line naming the file."""
    out = subprocess.run(
        twistd_command() + ["--nodaemon", "--pidfile=", "mailstack", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert (out.stdout + out.stderr).strip().splitlines() == [f"mailstack: {tmp_path / 'nope.toml'}: no such file"]


def test_sigtermLetsTransactionFinish(tmp_path):
    """A transaction in flight at SIGTERM completes (250 after DATA), new
    connections are refused, and the process still exits 0."""
    import signal
    import smtplib

    server = Server(tmp_path)
    assert server.admin("user", "add", "alice@localhost", "--password-stdin", input="pw\n").returncode == 0
    server.start()
    try:
        smtp = smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30)
        smtp.ehlo("client.example")
        assert smtp.mail("sender@example.org")[0] == 250
        assert smtp.rcpt("alice@localhost")[0] == 250
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=1).close()
            except OSError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("still listening after SIGTERM")
        code, _ = smtp.data(b"Subject: in flight\r\n\r\nbody\r\n")
        assert code == 250
        smtp.close()
        server.stop()
        assert len(os.listdir(os.path.join(server.maildir("alice@localhost"), "new"))) == 1
    finally:
        server.kill()


def test_portInUseOneLine(tmp_path):
    """A second server on the same ports exits non-zero with one line naming the port."""
    server = Server(tmp_path)
    server.start()
    try:
        out = subprocess.run(
            twistd_command() + ["--nodaemon", "--pidfile=", "mailstack", "--config", server.config_path],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert out.returncode != 0
        assert f"mailstack: cannot listen on 127.0.0.1:{server.ports['smtp']}" in out.stdout + out.stderr
        assert "Traceback" not in out.stdout + out.stderr
        server.stop()
    finally:
        server.kill()


def test_readmeQuickstart(tmp_path):
    """README's quickstart (add a user, send over submission, fetch over POP3S) works
    as written, with this server's ports and certificate substituted."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.rst"), encoding="utf-8").read()
    after = readme.split("or with Python, and fetch it again over POP3 with TLS::\n", 1)[1]
    block = []
    for line in after.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    server = Server(tmp_path)
    assert server.admin("user", "add", "alice@localhost", "--password-stdin", input="secret\n").returncode == 0
    server.start()
    try:
        code = (
            "\n".join(block)
            .replace("mailstack-data/tls/selfsigned.pem", os.path.join(server.data_dir, "tls", "selfsigned.pem"))
            .replace("5870", str(server.ports["submission"]))
            .replace("9950", str(server.ports["pop3s"]))
        )
        # One run: a message for local users is in its Maildir's new/ before the 250,
        # so the POP3 fetch right after it must find it.
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "It works." in out.stdout
        server.stop()
    finally:
        server.kill()


def test_harnessMovesAwayFromTakenPort(tmp_path):
    """If another process holds one of the chosen ports, the harness never mistakes
    it for the server: it picks new ports and the server really is there."""
    server = Server(tmp_path)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", server.ports["smtp"]))
    squatter.listen(5)
    taken = server.ports["smtp"]
    try:
        server.start()
        assert server.ports["smtp"] != taken
        with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as s:
            assert s.recv(100).startswith(b"220 ")
        server.stop()
    finally:
        squatter.close()
        server.kill()
