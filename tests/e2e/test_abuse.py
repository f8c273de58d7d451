"""End to end: abuse limits of a real ``twistd mailstack``.

One server for the module with small limits: 40 connections per IP, 400 in
all, an 8 s command timeout, 8 errors per session, AUTH failure delay 100 ms
doubling to 400 ms and a lockout after 6 failures; a second one (``capped``) for the caps
per listener kind, the POP3 login deadline and pipelining after DATA.  Loopback has a whole /8,
so clients bind to 127.0.0.x to act as different peers.
"""

from __future__ import annotations

import base64
import poplib
import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.e2e.harness import Server
from tests.e2e.sinks import RawSMTP, maildir_messages

PASSWORD = "abuse-pw"
PER_IP = 40
TOTAL = 400


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("abuse"),
        extra_toml=(
            f"[smtp]\nmax_connections = {TOTAL}\nmax_connections_per_ip = {PER_IP}\nmax_errors = 8\n"
            'command_timeout = "8s"\n'
            '[auth]\nplaintext_on_loopback = true\nfailure_delay = "100ms"\nmax_failure_delay = "400ms"\n'
            'lockout_failures = 6\nlockout_time = "5m"\n'
        ),
    )
    for user in ("alice@localhost", "bob@localhost", "carol@localhost", "dave@localhost"):
        r = s.admin("user", "add", user, "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
    s.start()
    yield s
    s.kill()


def connect_from(ip: str, port: int) -> socket.socket:
    c = socket.socket()
    c.settimeout(10)
    c.bind((ip, 0))
    c.connect(("127.0.0.1", port))
    return c


def read_line(c: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = c.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def on_each_at_once(clients: list[RawSMTP], action: Callable[[RawSMTP], None]) -> None:
    """Run ``action(client)`` for every client in a thread of its own, wait, close them all."""
    threads = [threading.Thread(target=action, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    close_all([c.sock for c in clients])


def close_all(socks: list[socket.socket]) -> None:
    for c in socks:
        try:
            c.close()
        except OSError:
            pass


def wait_for_slots(server: Server, ip: str, tries: int = 50) -> None:
    """The server counts a connection until it has processed the close: wait until ``ip`` is served."""
    for _ in range(tries):
        c = connect_from(ip, server.ports["smtp"])
        line = read_line(c)
        c.close()
        if line.startswith(b"220"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{ip} still refused: {line!r}")


def normal_transaction(server: Server, ip: str = "127.0.0.1") -> None:
    """Banner, EHLO, MAIL, RCPT, DATA, QUIT from ``ip``, each answered with the expected code.

    Served or not is what the callers check, not how fast: a loaded machine may be slow."""
    c = socket.socket()
    c.settimeout(10)
    c.bind((ip, 0))
    c.connect(("127.0.0.1", server.ports["smtp"]))
    f = c.makefile("rb")

    def reply() -> bytes:
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return line

    assert reply().startswith(b"220")
    for cmd, code in ((b"EHLO normal.test", b"250"), (b"MAIL FROM:<n@remote.example>", b"250"),
                      (b"RCPT TO:<alice@localhost>", b"250"), (b"DATA", b"354"),
                      (b"Subject: prompt\r\n\r\nhello\r\n.", b"250"), (b"QUIT", b"221")):
        c.sendall(cmd + b"\r\n")
        got = reply()
        assert got.startswith(code), (cmd, got)
    c.close()


def test_idleConnectionsDoNotStarveNormalClient(server) -> None:
    """350 idle connections (some holding half a command line) from 10 addresses: a normal client
    still gets its banner and completes a transaction."""
    idle = []
    try:
        for i in range(350):
            c = connect_from(f"127.0.1.{i % 10 + 1}", server.ports["smtp"])
            if i % 7 == 0:
                c.sendall(b"EHLO slowlor")  # no CRLF: a slow client mid-line
            idle.append(c)
        # All of them were accepted (and greeted) before we measure.
        for c in idle[::35]:
            assert read_line(c).startswith(b"220")
        normal_transaction(server)
    finally:
        close_all(idle)


def test_perIpCap(server) -> None:
    """The connection beyond max_connections_per_ip from one address gets 421 4.7.0 and is closed;
    another address is still served."""
    ip = "127.0.2.1"
    held = []
    try:
        for _ in range(PER_IP):
            c = connect_from(ip, server.ports["smtp"])
            assert read_line(c).startswith(b"220")
            held.append(c)
        extra = connect_from(ip, server.ports["smtp"])
        line = read_line(extra)
        assert line.startswith(b"421 4.7.0"), line
        assert extra.recv(100) == b""  # closed by the server
        extra.close()
        normal_transaction(server, "127.0.2.2")
    finally:
        close_all(held)
    wait_for_slots(server, ip)


def test_totalCap(server) -> None:
    """Beyond max_connections over all addresses the server answers 421 4.7.0 and hangs up;
    once connections go away it serves again."""
    held = []
    try:
        for i in range(TOTAL):
            c = connect_from(f"127.0.3.{i % 20 + 1}", server.ports["smtp"])
            held.append(c)
        # Every one greeted (so holding its slot) before the extra connects: the workers
        # accept from one queue, but a slot is taken when the master hears of it, so an
        # unread connection may still be on its way and lose its slot to the extra.
        for c in held:
            assert read_line(c).startswith(b"220")
        for c in held:  # keep every session alive (command_timeout) while we look
            c.sendall(b"NOOP\r\n")
        extra = connect_from("127.0.3.99", server.ports["smtp"])
        line = read_line(extra)
        assert line.startswith(b"421 4.7.0"), line
        extra.close()
    finally:
        close_all(held)
    wait_for_slots(server, "127.0.3.99")
    normal_transaction(server)


def _auth(c: RawSMTP, user: str, password: str) -> tuple[bytes, float]:
    token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    t0 = time.monotonic()
    reply = c.cmd(b"AUTH PLAIN " + token)
    return reply, time.monotonic() - t0


def test_authBruteForceSlowedAndLockedSharedWithPop3(server) -> None:
    """Wrong passwords from one peer get 535 5.7.8 ever more slowly; after lockout_failures even the
    right password gets 454 4.7.0 from that peer, for any account, on SMTP and on POP3 alike (one
    shared throttle); the account itself is not locked: its owner still logs in from elsewhere."""
    port = server.ports["smtp"]
    delays = []
    for _ in range(6):
        c = _RawFrom("127.0.4.1", port)
        c.cmd(b"EHLO brute.test")
        reply, took = _auth(c, "alice@localhost", "wrong")
        assert reply.startswith(b"535 5.7.8"), reply
        delays.append(took)
        c.close()
    assert delays[-1] >= 0.3, delays  # 100 ms doubling, capped at 400 ms
    assert delays[-1] > delays[0], delays

    c = _RawFrom("127.0.4.1", port)
    c.cmd(b"EHLO brute.test")
    reply, _ = _auth(c, "alice@localhost", PASSWORD)
    assert reply.startswith(b"454 4.7.0"), reply  # the peer is locked out
    reply, _ = _auth(c, "bob@localhost", PASSWORD)
    assert reply.startswith(b"454 4.7.0"), reply  # any account from that peer
    c.close()

    p = _Pop3From("127.0.4.1", server.ports["pop3"])
    p.user("carol@localhost")
    with pytest.raises(poplib.error_proto) as e:
        p.pass_(PASSWORD)
    assert b"-ERR [AUTH]" in e.value.args[0]  # POP3 shares the peer's lockout
    p.close()

    c = _RawFrom("127.0.4.2", port)
    c.cmd(b"EHLO other.test")
    reply, _ = _auth(c, "alice@localhost", PASSWORD)
    assert reply.startswith(b"235 2.7.0"), reply  # nobody can lock the account for everyone
    c.close()
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    p.user("alice@localhost")
    assert p.pass_(PASSWORD).startswith(b"+OK")
    p.quit()


def test_simultaneousAuthAttemptsReserved(server) -> None:
    """30 AUTH attempts with wrong passwords sent at the same moment from one address: each is
    reserved before its password check, so at most lockout_failures of them are checked (535 5.7.8)
    and the rest get 454 4.7.0 unchecked; the account's owner, from another address, still logs in
    on submission and on POP3."""
    port = server.ports["smtp"]
    clients = []
    for _ in range(30):
        c = _RawFrom("127.0.9.1", port)
        assert c.cmd(b"EHLO swarm.test").startswith(b"250")
        clients.append(c)
    barrier = threading.Barrier(len(clients))
    replies: list[bytes] = []

    def attempt(c: RawSMTP) -> None:
        barrier.wait()
        replies.append(_auth(c, "dave@localhost", "wrong")[0])

    on_each_at_once(clients, attempt)
    assert len(replies) == 30, replies
    checked = [r for r in replies if r.startswith(b"535 5.7.8")]
    refused = [r for r in replies if r.startswith(b"454 4.7.0")]
    assert len(checked) + len(refused) == 30, replies
    assert len(checked) <= 6, f"{len(checked)} attempts reached the password check"

    c = _RawFrom("127.0.9.2", server.ports["submission"])
    c.cmd(b"EHLO owner.test")
    reply, _ = _auth(c, "dave@localhost", PASSWORD)
    assert reply.startswith(b"235 2.7.0"), reply
    c.close()
    p = _Pop3From("127.0.9.2", server.ports["pop3"])
    p.user("dave@localhost")
    assert p.pass_(PASSWORD).startswith(b"+OK")
    p.quit()


def test_pop3FailuresCountForSmtp(server) -> None:
    """Failures on POP3 count towards the same peer lockout that then refuses SMTP AUTH (454 4.7.0)."""
    for _ in range(6):
        p = _Pop3From("127.0.5.1", server.ports["pop3"])
        p.user("bob@localhost")
        with pytest.raises(poplib.error_proto):
            p.pass_("wrong")
        p.close()
    c = _RawFrom("127.0.5.1", server.ports["smtp"])
    c.cmd(b"EHLO x")
    reply, _ = _auth(c, "bob@localhost", PASSWORD)
    assert reply.startswith(b"454 4.7.0"), reply
    c.close()


class _Pop3From(poplib.POP3):
    """poplib.POP3 from a chosen loopback address."""

    def __init__(self, ip: str, port: int) -> None:
        self._source = ip
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


def test_errorCapDropsSession(server) -> None:
    """max_errors bad commands: 500 5.5.2 each, then 421 4.7.0 and the connection is closed."""
    c = _RawFrom("127.0.6.1", server.ports["smtp"])
    replies = [c.cmd(b"XYZZY") for _ in range(8)]
    assert all(r.startswith(b"500 5.5.2") for r in replies[:7]), replies
    assert c.reply().startswith(b"421 4.7.0")
    assert c.f.readline() == b""
    c.close()


def test_idleTimeout(server) -> None:
    """A client that says nothing for command_timeout gets 421 4.4.2 and is disconnected."""
    c = _RawFrom("127.0.7.1", server.ports["smtp"])
    c.sock.settimeout(20)
    t0 = time.monotonic()
    line = c.f.readline()
    took = time.monotonic() - t0
    assert line.startswith(b"421 4.4.2"), line
    assert 7.0 <= took < 16.0, took
    assert c.f.readline() == b""
    c.close()


class _RawFrom(RawSMTP):
    """RawSMTP from a chosen loopback address."""

    def __init__(self, ip: str, port: int) -> None:
        self.sock = connect_from(ip, port)
        self.f = self.sock.makefile("rb")
        self.banner = self.reply()


def _kernel_buffers() -> int:
    """Most bytes the kernel can hold for a loopback flood: the client's send buffer and the
    server's receive buffer, plus the server's send buffer of replies (at most as many command
    bytes as reply bytes), each at its autotuning ceiling."""

    def ceiling(name: str) -> int:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])

    return 2 * ceiling("tcp_wmem") + ceiling("tcp_rmem")


# What the server itself may hold while it stops reading (input not yet parsed, replies not yet
# written, more of both when a loaded machine delays the reactor between reads); a server that
# kept reading would buffer without bound (the whole 30 s flood).
_APP_SLACK = 4 << 20


def _flood_unread(c: socket.socket, command: bytes, stall: float = 1.5, deadline: float = 30.0) -> int:
    """Pipeline ``command`` without reading a reply until a send has blocked for ``stall`` seconds.

    Returns the bytes sent.  A server that stops reading once its replies back up makes the send
    block; one that keeps reading never does, and the flood fails after ``deadline``.  The server
    resets its command timer on every read, so the session outlives the flood.
    """
    c.settimeout(stall)
    chunk = command * 10000
    sent = 0
    t0 = time.monotonic()
    while True:
        try:
            sent += c.send(chunk)
        except TimeoutError:
            return sent
        assert time.monotonic() - t0 < deadline, f"the server kept reading: {sent} bytes in {deadline}s"


def _collect_replies(c: socket.socket, sent: int, command: bytes, timeout: float) -> list[bytes]:
    """Complete the last partial command, send QUIT and read every reply line."""
    c.settimeout(30)
    lines: list[bytes] = []
    f = c.makefile("rb")
    reader = threading.Thread(target=lambda: lines.extend(iter(f.readline, b"")), daemon=True)
    reader.start()
    if sent % len(command):
        c.sendall(command[sent % len(command) :])
    c.sendall(b"QUIT\r\n")
    reader.join(timeout)
    return lines


def test_pipelinedFloodWithoutReading(server) -> None:
    """A client that pipelines NOOPs and never reads the replies is stopped: the server stops
    reading when its write buffer is full, so no more than the kernel's socket buffers get through;
    when the client finally reads, every NOOP has its 250 in order and the session answers QUIT."""
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.bind(("127.0.8.1", 0))
    c.connect(("127.0.0.1", server.ports["smtp"]))
    sent = _flood_unread(c, b"NOOP\r\n")
    # Once the socket buffers are full the server stops reading: nothing more gets through.
    assert sent < _kernel_buffers() + _APP_SLACK, f"the server buffered {sent} bytes"
    lines = _collect_replies(c, sent, b"NOOP\r\n", 120)
    noops = -(-sent // 6)
    assert lines[0].startswith(b"220")
    assert lines[1:-1] == [b"250 2.0.0 Ok\r\n"] * noops
    assert lines[-1].startswith(b"221 2.0.0")
    c.close()


def test_pop3FloodWithoutReading(server) -> None:
    """POP3 before login: pipelined CAPAs whose responses are never read stop being read by the
    server (no more than the kernel's socket buffers get through); afterwards every CAPA is
    answered in order and QUIT works."""
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", server.ports["pop3"]))
    sent = _flood_unread(c, b"CAPA\r\n")
    assert sent < _kernel_buffers() + _APP_SLACK, f"the server buffered {sent} bytes"
    lines = _collect_replies(c, sent, b"CAPA\r\n", 120)
    capas = -(-sent // 6)
    assert lines[0].startswith(b"+OK")
    assert sum(1 for line in lines if line.startswith(b"+OK Capability list follows")) == capas
    assert lines[-1].startswith(b"+OK") and b"signing off" in lines[-1]
    c.close()


# -- caps per listener kind, the POP3 login deadline, pipelining after DATA ---------------


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """A second server with small caps: 20 MX connections, 5 per address on submission, 10
    POP3 connections per address and a 2 s POP3 login deadline."""
    s = Server(
        tmp_path_factory.mktemp("capped"),
        extra_toml=(
            "[smtp]\nmax_connections = 20\nmax_connections_per_ip = 20\n"
            "[submission]\nmax_connections = 20\nmax_connections_per_ip = 5\n"
            '[pop3]\nmax_connections_per_ip = 10\nlogin_timeout = "2s"\n'
            "[auth]\nplaintext_on_loopback = true\n"
        ),
    )
    for user in ("alice@localhost", "bob@localhost"):
        r = s.admin("user", "add", user, "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
    s.start()
    yield s
    s.kill()


def test_pop3IdleConnectionsCappedPerIpAndTimedOut(capped) -> None:
    """61 idle POP3 connections from one address: 10 get the greeting, the rest -ERR [SYS/TEMP] and
    are closed; another address still logs in; the 10 that never log in are closed by the server
    once pop3.login_timeout has passed."""
    port = capped.ports["pop3"]
    held = [connect_from("127.0.10.1", port) for _ in range(61)]
    try:
        greetings = [read_line(c) for c in held]
        admitted = [c for c, g in zip(held, greetings, strict=True) if g.startswith(b"+OK")]
        refused = [g for g in greetings if not g.startswith(b"+OK")]
        assert len(admitted) == 10, greetings
        assert all(g.startswith(b"-ERR [SYS/TEMP] Too many connections from your address") for g in refused), refused
        p = _Pop3From("127.0.10.2", port)
        p.user("alice@localhost")
        assert p.pass_(PASSWORD).startswith(b"+OK")
        p.quit()
        for c in admitted:
            assert read_line(c).startswith(b"-ERR [SYS/TEMP] Login timeout"), "no login timeout"
            assert c.recv(100) == b""
    finally:
        close_all(held)


def test_mxFloodDoesNotRefuseSubmission(capped) -> None:
    """With every MX slot taken (the next MX client gets 421 4.7.0), a user on the submission
    listener is still served: it has connection caps of its own."""
    flood = [connect_from(f"127.0.11.{i % 10 + 1}", capped.ports["smtp"]) for i in range(20)]
    try:
        assert all(read_line(c).startswith(b"220") for c in flood)
        extra = connect_from("127.0.11.50", capped.ports["smtp"])
        assert read_line(extra).startswith(b"421 4.7.0")
        extra.close()
        c = _RawFrom("127.0.11.60", capped.ports["submission"])
        assert c.banner.startswith(b"220")
        c.cmd(b"EHLO user.test")
        assert _auth(c, "alice@localhost", PASSWORD)[0].startswith(b"235")
        for line, code in ((b"MAIL FROM:<alice@localhost>", b"250"), (b"RCPT TO:<bob@localhost>", b"250"),
                           (b"DATA", b"354"), (b"Subject: during the flood\r\n\r\nhi\r\n.", b"250")):
            assert c.cmd(line).startswith(code), line
        c.close()
    finally:
        close_all(flood)


def test_unauthPipeliningAfterDataDropped(capped) -> None:
    """An unauthenticated MX client that sends the message before the 354 gets 554 5.5.0 and is
    disconnected; nothing is delivered."""
    c = _RawFrom("127.0.12.1", capped.ports["smtp"])
    c.sock.sendall(b"EHLO x\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n"
                   b"Subject: smuggled\r\n\r\nhi\r\n.\r\n")
    replies = [c.reply() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"554"], replies
    assert replies[3].startswith(b"554 5.5.0"), replies
    assert c.f.readline() == b""
    c.close()
    assert not any(b"smuggled" in m for m in maildir_messages(capped.maildir("bob@localhost")))


def test_inputBehindRefusedDataDiscarded(capped) -> None:
    """DATA refused (no valid recipient) on an authenticated session: what was pipelined behind it
    in the same packet is discarded, never run as commands, and the session carries on."""
    c = _RawFrom("127.0.12.2", capped.ports["submission"])
    c.cmd(b"EHLO user.test")
    assert _auth(c, "alice@localhost", PASSWORD)[0].startswith(b"235")
    c.sock.sendall(b"MAIL FROM:<alice@localhost>\r\nRCPT TO:<nobody@localhost>\r\nDATA\r\n"
                   b"RSET\r\nMAIL FROM:<alice@localhost>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n"
                   b"Subject: injected\r\n\r\n.\r\n")
    replies = [c.reply() for _ in range(3)]
    assert [r[:3] for r in replies] == [b"250", b"550", b"554"], replies
    assert c.cmd(b"NOOP").startswith(b"250 2.0.0"), "commands behind the refused DATA were run"
    assert c.cmd(b"QUIT").startswith(b"221")
    c.close()
    assert not any(b"injected" in m for m in maildir_messages(capped.maildir("bob@localhost")))


def test_hourlyLimitHoldsUnderConcurrency(tmp_path) -> None:
    """With a limit of 3 messages an hour, 8 sessions of one user sending at the same moment get
    exactly 3 messages through: the MAIL reserves the message before the DATA, so parallel
    sessions cannot all pass the check first (451 4.7.1 for the others, naming the limit)."""
    with Server(tmp_path, extra_toml="[limits]\nmessages_per_hour = 3\n[auth]\nplaintext_on_loopback = true\n") as s:
        s.add_users({"erin@localhost": PASSWORD})
        s.start()
        clients = []
        for _ in range(8):
            c = _RawFrom("127.0.10.1", s.ports["submission"])
            assert c.cmd(b"EHLO burst.test").startswith(b"250")
            assert _auth(c, "erin@localhost", PASSWORD)[0].startswith(b"235")
            clients.append(c)
        barrier = threading.Barrier(len(clients))
        outcomes: list[bytes] = []

        def send(c: RawSMTP) -> None:
            barrier.wait()
            reply = c.cmd(b"MAIL FROM:<erin@localhost>")
            if reply.startswith(b"250"):
                assert c.cmd(b"RCPT TO:<erin@localhost>").startswith(b"250")
                assert c.cmd(b"DATA").startswith(b"354")
                reply = c.cmd(b"Subject: burst\r\n\r\nhello\r\n.")
            outcomes.append(reply)

        on_each_at_once(clients, send)
        assert len(outcomes) == 8, outcomes
        sent = [r for r in outcomes if r.startswith(b"250")]
        refused = [r for r in outcomes if r.startswith(b"451 4.7.1") and b"Hourly" in r]
        assert (len(sent), len(refused)) == (3, 5), outcomes
        assert len(list(maildir_messages(s.maildir("erin@localhost")))) == 3
        s.shut_down()
