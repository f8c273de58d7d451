"""Private Postfix and Dovecot instances (the reference servers), under a work folder.

Nothing of the system instances is used or changed: Postfix runs with
``postfix -c <dir>`` and its own main.cf/master.cf, queue and data folders, and
Dovecot with ``dovecot -c <file>`` and its own base_dir.  Both listen on loopback
high ports only.  Mail for the virtual domain ``bench.test`` goes through Postfix's
virtual(8) agent into Maildirs under ``<work>/pfmail/bench.test/<user>/`` owned by
a numeric uid (no system user needed), which Dovecot serves over POP3.  Everything
else is relayed to ``[127.0.0.1]:<sink port>``.

Settings are the durable defaults (Postfix fsyncs the queue file before 250 and the
Maildir file before it counts as delivered; Dovecot ``mail_fsync = optimized``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import sink
from procmem import free_port, process_tree, wait_port

DOMAIN = "bench.test"
VUID = 5000  # owner of the reference Maildirs (numeric, no passwd entry needed)


def available() -> tuple[bool, str]:
    """(True, "") if the Postfix and Dovecot binaries are there, else (False, why)."""
    missing = [b for b in ("postfix", "dovecot") if not (shutil.which(b) or os.path.exists(f"/usr/sbin/{b}"))]
    if missing:
        return False, "not installed: " + ", ".join(missing)
    if os.geteuid() != 0:
        return False, "the private Postfix/Dovecot instances need root"
    return True, ""


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Postfix:
    def __init__(self, work: str, users: list[str], sink_port: int, aliases: dict[str, str] | None = None):
        self.root = os.path.join(work, "postfix")
        self.conf = os.path.join(self.root, "conf")
        self.queue = os.path.join(self.root, "queue")
        self.data = os.path.join(self.root, "data")
        self.mailbase = os.path.join(work, "pfmail")
        self.log = os.path.join(self.root, "postfix.log")
        self.users = users
        self.aliases = aliases or {}
        self.sink_port = sink_port
        self.port = free_port()
        # Submission for the one-message-per-connection workload: STARTTLS offered,
        # no AUTH (127.0.0.0/8 is in mynetworks, so the client may relay).
        self.submission_port = free_port()
        self.started = False

    def maildir(self, user: str) -> str:
        local, _, domain = user.partition("@")
        return os.path.join(self.mailbase, domain, local)

    def write_config(self) -> None:
        for d in (self.conf, self.queue, self.data, self.mailbase):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.root, 0o755)
        pf = __import__("pwd").getpwnam("postfix")
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        os.makedirs(os.path.join(self.mailbase, DOMAIN), exist_ok=True)
        os.chown(self.mailbase, VUID, VUID)
        os.chown(os.path.join(self.mailbase, DOMAIN), VUID, VUID)
        with open(os.path.join(self.conf, "vmailbox"), "w") as f:
            for u in self.users:
                local, _, domain = u.partition("@")
                f.write(f"{u} {domain}/{local}/\n")
        with open(os.path.join(self.conf, "valias"), "w") as f:
            for a, t in self.aliases.items():
                f.write(f"{a} {t}\n")
        main_cf = f"""\
compatibility_level = 3.6
config_directory = {self.conf}
queue_directory = {self.queue}
data_directory = {self.data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.{DOMAIN}
mydomain = {DOMAIN}
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_banner = $myhostname ESMTP
biff = no
smtputf8_enable = no
message_size_limit = 67108864
mailbox_size_limit = 0
virtual_mailbox_limit = 0
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {self.mailbase}
virtual_mailbox_maps = texthash:{self.conf}/vmailbox
virtual_alias_maps = texthash:{self.conf}/valias
virtual_uid_maps = static:{VUID}
virtual_gid_maps = static:{VUID}
virtual_minimum_uid = 100
relayhost = [127.0.0.1]:{self.sink_port}
smtp_dns_support_level = disabled
# The sink offers STARTTLS (mailstack's client requires it at a smarthost), so
# Postfix relays over TLS too, reusing TLS connections through tlsproxy(8).
smtp_tls_security_level = encrypt
smtp_tls_connection_reuse = yes
smtp_tls_session_cache_database = btree:{self.data}/smtp_scache
smtpd_tls_security_level = none
maillog_file = {self.log}
maillog_file_prefixes = {self.root}
"""
        svc = [
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("local", "unix", "-", "n", "n", "-", "-", "local"),
            ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("tlsproxy", "unix", "-", "-", "n", "-", "0", "tlsproxy"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        pem = os.path.join(self.conf, "submission.pem")
        with open(pem, "wb") as f:
            f.write(sink.self_signed_pem(f"postfix.{DOMAIN}"))
        master = [f"127.0.0.1:{self.port} inet n - n - - smtpd"]
        master.append(f"127.0.0.1:{self.submission_port} inet n - n - - smtpd"
                      f" -o smtpd_tls_security_level=may -o smtpd_tls_chain_files={pem}")
        master += [" ".join(s) for s in svc]
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(main_cf)
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write("\n".join(master) + "\n")

    def _postfix(self, *args, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run([_bin("postfix"), "-c", self.conf, *args], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            why = (r.stderr + r.stdout).strip()
            if not why and shutil.which("script"):
                # Postfix logs fatal errors to stderr only when it is a terminal.
                cmd = " ".join([_bin("postfix"), "-c", self.conf, "check"])
                why = subprocess.run(["script", "-qc", cmd, "/dev/null"], stdin=subprocess.DEVNULL,
                                     capture_output=True, text=True, timeout=60).stdout.strip()
            raise RuntimeError(f"postfix {' '.join(args)} failed: {why[-500:]}")
        return r

    def start(self) -> None:
        self.write_config()
        self._postfix("check", check=False)
        self.started = True
        self._postfix("start")
        wait_port(self.port, 30)

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        pid = self.master_pid()
        return process_tree(pid) if pid else []

    def roots(self) -> list[int]:
        pid = self.master_pid()
        return [pid] if pid else []

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            d = os.path.join(self.queue, sub)
            for _dirpath, _dirs, files in os.walk(d):
                if files:
                    return False
        return True

    def stop(self) -> None:
        if not self.started:
            return
        pids = self.pids()
        try:
            self._postfix("stop", check=False)
        except Exception:
            pass
        reap(pids)
        self.started = False


def reap(pids: list[int], grace: float = 10.0) -> None:
    """Wait up to ``grace`` seconds for ``pids`` to exit after a stop, then SIGKILL the rest."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def password_hash(pw: str) -> str:
    """The Dovecot passdb form of ``pw``: Argon2id with mailstack's parameters when
    argon2-cffi is there (so both servers spend the same on a login), else PLAIN."""
    try:
        import argon2
    except ImportError:
        return "{PLAIN}" + pw
    return "{ARGON2ID}" + argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash(pw)


class Dovecot:
    def __init__(self, work: str, users: dict[str, str], mailbase: str):
        """``users``: address -> password; Maildirs at ``<mailbase>/<domain>/<local>``."""
        self.root = os.path.join(work, "dovecot")
        self.conf = os.path.join(self.root, "dovecot.conf")
        self.base_dir = os.path.join(self.root, "run")
        self.users = users
        self.mailbase = mailbase
        self.port = free_port()
        self.log = os.path.join(self.root, "dovecot.log")
        self.started = False

    def write_config(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.makedirs(os.path.join(self.root, "state"), exist_ok=True)
        passwd = os.path.join(self.root, "passwd")
        with open(passwd, "w") as f:
            for u, pw in self.users.items():
                local, _, domain = u.partition("@")
                home = os.path.join(self.mailbase, domain, local)
                f.write(f"{u}:{password_hash(pw)}:{VUID}:{VUID}::{home}::\n")
        os.chown(passwd, 0, __import__("grp").getgrnam("dovecot").gr_gid)
        os.chmod(passwd, 0o640)
        conf = f"""\
base_dir = {self.base_dir}
state_dir = {self.root}/state
instance_name = bench-dovecot-{self.port}
log_path = {self.log}
info_log_path = {self.log}
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = 100
mail_location = maildir:{self.mailbase}/%d/%n
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def start(self) -> None:
        self.write_config()
        self.started = True
        # The daemon keeps inherited descriptors: send its output to a file, not a pipe.
        out = os.path.join(self.root, "start.out")
        with open(out, "w") as f:
            r = subprocess.run(
                [_bin("dovecot"), "-c", self.conf], stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=60
            )
        if r.returncode != 0:
            with open(out) as f:
                raise RuntimeError(f"dovecot failed to start: {f.read().strip()[-500:]}")
        wait_port(self.port, 30)

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.base_dir, "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def roots(self) -> list[int]:
        pid = self.master_pid()
        return [pid] if pid else []

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        pids = process_tree(pid) if pid else []
        subprocess.run([_bin("dovecot"), "-c", self.conf, "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        reap(pids)
        self.started = False
