"""End to end: mailstack started as root with ``twistd --uid``, Dovecot beside it.

mailstack drops to an unprivileged account (nobody) and everything it makes at
start (data_dir, the certificate and key, the queue and Maildir folders)
belongs to that account.  It delivers a message over SMTP into a Maildir; a
private Dovecot (etc/dovecot-imap.conf, as in test_dovecot_imap.py) serves
IMAP from the same data_dir with the passwd-file mailstack keeps
(``[dovecot] passwd_file``): IMAP logs in with the mailstack password and
fetches the message byte-exact, a password change works without restarting
Dovecot, and mailstack's POP3 still lists the message with the same UIDL
after Dovecot has indexed it and renamed it into ``cur/`` with a flag.

The admin command runs as root here (the account cannot run this
interpreter); the files it writes are given to the account afterwards, as
running it as the account would have left them.
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import pwd
import shutil
import smtplib
import tempfile
import time

import pytest

from tests.e2e import test_dovecot_imap as imap_test
from tests.e2e.harness import Server


def _missing() -> str:
    reason = imap_test._dovecot_missing()
    if reason:
        return reason
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "no 'nobody' account"
    return ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "-")

USER = "alice@localhost"
ACCOUNT = pwd.getpwnam("nobody").pw_uid if not _missing() else 65534


class DroppingServer(Server):
    """twistd started as root with ``--uid``/``--gid`` of the account."""

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("mailstack")
        return cmd[:at] + ["--uid", str(ACCOUNT), "--gid", str(ACCOUNT)] + cmd[at:]


def wait_until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


@pytest.fixture
def world(monkeypatch):
    # Under /tmp with mode 0755 (Dovecot's processes and the account must reach it).
    root = tempfile.mkdtemp(prefix="mailstack-drop-")
    os.chmod(root, 0o755)
    state = os.path.join(root, "home")  # the account's, like /var/lib/mailstack's parent
    os.makedirs(state, mode=0o755)
    os.chown(state, ACCOUNT, ACCOUNT)
    data_dir = os.path.join(state, "data")
    etc = os.path.join(root, "etc")
    os.makedirs(etc, mode=0o755)
    passwd = os.path.join(etc, "passwd")
    server = DroppingServer(
        root,
        extra_toml=(
            f'data_dir = "{data_dir}"\n'
            f'[dovecot]\npasswd_file = "{passwd}"\n'
            "[auth]\nplaintext_on_loopback = true\n"
            "[listen]\nsubmissions = []\npop3s = []\n"
        ),
    )
    server.data_dir = data_dir
    monkeypatch.setattr(imap_test, "MAIL_UID", ACCOUNT)
    dovecot = imap_test.Dovecot(root, data_dir, passwd)
    try:
        yield server, dovecot, passwd
    finally:
        dovecot.stop()
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


def admin(server: Server, passwd: str, *args: str, input: str | None = None) -> None:
    """Run the admin command; its files then belong to the account (see the module docstring)."""
    r = server.admin(*args, input=input)
    assert r.returncode == 0, r.stderr
    for name in ("users.json", "users.lock"):
        path = os.path.join(server.data_dir, name)
        if os.path.exists(path):
            os.chown(path, ACCOUNT, ACCOUNT)
    os.chown(passwd, ACCOUNT, grp.getgrnam(imap_test.PASSWD_GROUP).gr_gid)


def owners(folder: str) -> set[int]:
    found = {os.stat(folder).st_uid}
    for parent, dirs, files in os.walk(folder):
        found |= {os.lstat(os.path.join(parent, n)).st_uid for n in dirs + files}
    return found


def pop3_uidls(server: Server, password: str) -> list[bytes]:
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    try:
        pop.user(USER)
        pop.pass_(password)
        return pop.uidl()[1]
    finally:
        pop.quit()


def test_privilegeDropDovecotImapAndPop3(world):
    """Files made at start belong to the --uid account; SMTP into a Maildir, IMAP
    via Dovecot byte-exact with the mailstack password, a password change seen by
    Dovecot at once, POP3 UIDLs unchanged after Dovecot indexed and flagged the message."""
    server, dovecot, passwd = world
    server.start()
    try:
        data_dir = server.data_dir
        assert owners(data_dir) == {ACCOUNT}
        for path in ("tls/selfsigned.key", "tls/selfsigned.pem", "queue/env"):
            assert os.stat(os.path.join(data_dir, path)).st_uid == ACCOUNT, path
        assert os.stat(os.path.join(data_dir, "tls/selfsigned.key")).st_mode & 0o077 == 0

        admin(server, passwd, "user", "add", USER, "--password-stdin", input="first pw\n")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as c:
            c.sendmail(
                "bob@example.net",
                [USER],
                b"Subject: via dovecot\r\nMessage-ID: <d1@example.net>\r\n\r\nline\r\n.dot\r\n",
            )
        new = os.path.join(server.maildir(USER), "new")
        (name,) = wait_until(lambda: os.listdir(new) if os.path.isdir(new) else [])
        with open(os.path.join(new, name), "rb") as f:
            on_disk = f.read()
        assert owners(server.maildir(USER)) == {ACCOUNT}
        before = pop3_uidls(server, "first pw")
        assert len(before) == 1

        dovecot.start()
        with imaplib.IMAP4("127.0.0.1", dovecot.imap) as client:
            client.starttls(imap_test.tls_context())
            client.login(USER, "first pw")
            assert imap_test.fetch_all(client) == on_disk, dovecot.diagnostics()
            assert client.select("INBOX")[0] == "OK"
            assert client.store("1", "+FLAGS", "(\\Seen \\Flagged)")[0] == "OK"
            client.logout()
        cur = os.listdir(os.path.join(server.maildir(USER), "cur"))
        assert len(cur) == 1 and cur[0].endswith(":2,FS"), cur  # Dovecot renamed it with its flags
        assert os.path.exists(os.path.join(server.maildir(USER), "dovecot-uidlist"))

        admin(server, passwd, "user", "passwd", USER, "--password-stdin", input="second pw\n")
        # Dovecot checks a passwd-file for changes at most once a second: the old
        # password stops working within that second, without a reload.
        deadline = time.monotonic() + 5
        while True:
            with imaplib.IMAP4("127.0.0.1", dovecot.imap) as client:
                client.starttls(imap_test.tls_context())
                try:
                    client.login(USER, "first pw")
                except imaplib.IMAP4.error:
                    break
                client.logout()
            assert time.monotonic() < deadline, "the old password still works in Dovecot"
            time.sleep(0.2)
        with imaplib.IMAP4("127.0.0.1", dovecot.imap) as client:
            client.starttls(imap_test.tls_context())
            client.login(USER, "second pw")
            assert imap_test.fetch_all(client) == on_disk
            client.logout()

        assert pop3_uidls(server, "second pw") == before
        server.stop()
    finally:
        server.kill()
