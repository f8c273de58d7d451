"""The multi-process model end to end: a master and session workers (``[server] processes``)."""

from __future__ import annotations

import os
import signal
import smtplib
import socket

from tests.e2e.harness import Server, alive, wait_until


def send(server: Server, subject: str) -> int:
    """One message to postmaster over the MX port; 250 when every recipient was accepted."""
    message = f"Subject: {subject}\r\n\r\nbody\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as c:
        return 250 if not c.sendmail("a@example.net", ["postmaster@localhost"], message) else 0


def delivered(server: Server) -> int:
    return len(os.listdir(os.path.join(server.maildir("postmaster@localhost"), "new")))


def test_workersServeAndARestartedWorkerKeepsServing(tmp_path):
    """processes = 2: two workers serve the listeners; one killed with SIGKILL is started again
    and mail is still accepted; SIGTERM stops the master and every worker with status 0."""
    server = Server(tmp_path, extra_toml="[server]\nprocesses = 2\n")
    server.start()
    try:
        workers = wait_until(lambda: len(w := server.workers()) == 2 and w, what="two workers")
        for i in range(6):
            assert send(server, f"m{i}") == 250
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: len(w := server.workers()) == 2 and workers[0] not in w, what="the restart")
        wait_until(lambda: "worker 0 exited" in server.log(), what="the log line")
        for i in range(6, 12):
            assert send(server, f"m{i}") == 250
        assert delivered(server) == 12
        after = server.workers()
        server.stop()
        assert not any(alive(pid) for pid in after)
    finally:
        server.kill()


def test_connectionCapSharedByWorkers(tmp_path):
    """smtp.max_connections_per_ip holds over all workers together: of six connections from one
    address with a cap of 2, exactly two are greeted and four are told 421 4.7.0."""
    server = Server(tmp_path, extra_toml="[server]\nprocesses = 2\n[smtp]\nmax_connections_per_ip = 2\n")
    server.start()
    socks = []
    try:
        greetings = []
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=30)
            socks.append(s)
            greetings.append(s.recv(200)[:3])
        assert sorted(greetings) == [b"220", b"220", b"421", b"421", b"421", b"421"]
    finally:
        for s in socks:
            s.close()
        server.shut_down()


def test_workersLeaveWithAKilledMaster(tmp_path):
    """A master killed with SIGKILL takes its workers down (they are told by the kernel), so a
    restarted server can listen again and finds the mail accepted before."""
    server = Server(tmp_path, extra_toml="[server]\nprocesses = 2\n")
    server.start()
    try:
        assert send(server, "before") == 250
        workers = wait_until(lambda: len(w := server.workers()) == 2 and w, what="two workers")
        server.kill()
        wait_until(lambda: not any(alive(pid) for pid in workers), what="the workers to exit")
        server.start()
        assert send(server, "after") == 250
        wait_until(lambda: delivered(server) == 2, what="both messages")
    finally:
        server.shut_down()
