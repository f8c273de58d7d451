"""End to end: Dovecot, run with etc/dovecot-imap.conf, serves IMAP on a Maildir
written by mailstack's MaildirStore, with the passwd-file dovecotpw keeps.

A private Dovecot instance (own base_dir, loopback ports) is started as root;
the Maildir belongs to a numeric uid, as it would to the mailstack account.
imaplib logs in over STARTTLS and IMAPS and fetches the message byte-exact; a
password changed in users.json works after the next sync, without a restart.
"""

from __future__ import annotations

import grp
import imaplib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import pytest

from mailstack import dovecotpw
from mailstack.auth.userdb import UserDB
from mailstack.storage.maildir import MaildirStore
from mailstack.tls import generate_self_signed
from tests.e2e.harness import free_ports

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "dovecot-imap.conf")
MAIL_UID = 5000  # the account mailstack runs as (numeric: no passwd entry needed)
# The group of the passwd-file, as the admin command leaves it (the primary
# group of the account that runs it); Dovecot's auth process reads through it.
PASSWD_GROUP = "users"
USER = "alice@example.org"
MESSAGE = (
    b"From: Bob <bob@example.net>\r\nTo: alice@example.org\r\nSubject: over IMAP\r\n"
    b"Message-ID: <imap-1@example.net>\r\n\r\nline one\r\n.leading dot\r\n\r\nlast line\r\n"
)


def _dovecot_missing() -> str:
    if not shutil.which("dovecot") and not os.path.exists("/usr/sbin/dovecot"):
        return "dovecot is not installed"
    if not os.path.exists("/usr/lib/dovecot/imap"):
        return "dovecot-imapd is not installed"
    if os.geteuid() != 0:
        return "a private Dovecot instance needs root"
    return ""


pytestmark = pytest.mark.skipif(bool(_dovecot_missing()), reason=_dovecot_missing() or "-")


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the self-signed certificate mailstack made
    return ctx


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Dovecot:
    """etc/dovecot-imap.conf with this test's paths, account and ports."""

    def __init__(self, root: str, data_dir: str, passwd: str) -> None:
        self.root = root
        self.conf = os.path.join(root, "dovecot.conf")
        self.log = os.path.join(root, "dovecot.log")
        self.base_dir = os.path.join(root, "run")
        self.imap, self.imaps = free_ports(2)
        with open(CONF) as f:
            text = f.read()
        for old, new in [
            ("/var/lib/mailstack", data_dir),
            ("/etc/mailstack/dovecot/passwd", passwd),
            ("uid=mailstack gid=mailstack", f"uid={MAIL_UID} gid={MAIL_UID}"),
            ("extra_groups = mailstack", f"extra_groups = {PASSWD_GROUP}"),
            ("listen = *, ::", "listen = 127.0.0.1"),
            ("port = 143", f"port = {self.imap}"),
            ("port = 993", f"port = {self.imaps}"),
        ]:
            assert old in text, f"{old!r} is no longer in {CONF}"
            text = text.replace(old, new)
        os.makedirs(os.path.join(root, "state"))
        text += (
            f"\n# private test instance\nbase_dir = {self.base_dir}\nstate_dir = {root}/state\n"
            f"instance_name = mailstack-test-{self.imap}\nlog_path = {self.log}\n"
        )
        with open(self.conf, "w") as f:
            f.write(text)

    def start(self) -> None:
        out = os.path.join(self.root, "start.out")
        with open(out, "w") as f:
            r = subprocess.run(
                ["dovecot", "-c", self.conf], stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=60, check=False
            )
        if r.returncode != 0:
            with open(out) as f:
                raise AssertionError(f"dovecot failed to start: {f.read()[-1000:]}")
        wait_port(self.imap, 30)
        wait_port(self.imaps, 30)

    def stop(self) -> None:
        try:
            with open(os.path.join(self.base_dir, "master.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        subprocess.run(["dovecot", "-c", self.conf, "stop"], capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)

    def diagnostics(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-2000:]
        except OSError:
            return "(no dovecot log)"


@pytest.fixture
def setup():
    # Under /tmp with mode 0755, not pytest's 0700 folder: Dovecot's processes
    # run as the mail uid and as its own users and must reach the files.
    root = tempfile.mkdtemp(prefix="mailstack-dovecot-")
    os.chmod(root, 0o755)
    data_dir = os.path.join(root, "data")
    os.makedirs(os.path.join(data_dir, "tls"))
    generate_self_signed(
        "localhost", os.path.join(data_dir, "tls", "selfsigned.pem"), os.path.join(data_dir, "tls", "selfsigned.key")
    )
    users = UserDB(os.path.join(data_dir, "users.json"))
    users.add(USER, "correct horse")
    name = MaildirStore(os.path.join(data_dir, "mail")).deliver(USER, MESSAGE, b"Return-Path: <bob@example.net>\r\n")
    message_path = os.path.join(data_dir, "mail", "example.org", "alice", "new", name)
    etc = os.path.join(root, "etc")
    os.makedirs(etc, mode=0o755)
    passwd = os.path.join(etc, "passwd")
    dovecotpw.sync(users, passwd)
    os.chown(passwd, MAIL_UID, grp.getgrnam(PASSWD_GROUP).gr_gid)
    for folder, dirs, files in os.walk(data_dir):
        for entry in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            os.chown(entry, MAIL_UID, MAIL_UID)
    dovecot = Dovecot(root, data_dir, passwd)
    try:
        dovecot.start()
        yield dovecot, users, passwd, message_path
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


def fetch_all(client: imaplib.IMAP4) -> bytes:
    typ, data = client.select("INBOX", readonly=True)
    assert typ == "OK" and data == [b"1"], data
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK", data
    return data[0][1]


def test_imapLoginAndFetchByteExact(setup):
    """STARTTLS and IMAPS logins with mailstack's password; the message is the file's bytes."""
    dovecot, _, _, message_path = setup
    with open(message_path, "rb") as f:
        on_disk = f.read()
    with imaplib.IMAP4("127.0.0.1", dovecot.imap) as client:
        client.starttls(tls_context())
        client.login(USER, "correct horse")
        assert fetch_all(client) == on_disk, dovecot.diagnostics()
        client.logout()
    with imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps, ssl_context=tls_context()) as client:
        client.login(USER, "correct horse")
        assert fetch_all(client) == on_disk
        client.logout()


def test_passwordChangeTakesEffect(setup):
    """After user passwd and a sync, the new password works and the old one fails, without a reload."""
    dovecot, users, passwd, _ = setup
    users.set_password(USER, "battery staple")
    dovecotpw.sync(users, passwd)
    os.chown(passwd, MAIL_UID, grp.getgrnam(PASSWD_GROUP).gr_gid)
    with (
        imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps, ssl_context=tls_context()) as client,
        pytest.raises(imaplib.IMAP4.error),
    ):
        client.login(USER, "correct horse")
    with imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps, ssl_context=tls_context()) as client:
        client.login(USER, "battery staple")
        client.logout()
