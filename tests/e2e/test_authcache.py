"""End to end: the login cache never outlives a password change or a deletion on a running server."""

from __future__ import annotations

import smtplib
import ssl

import pytest

from tests.e2e.harness import Server


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def submission_login(server: Server, user: str, password: str) -> tuple[int, bytes]:
    """(code, text) of AUTH PLAIN after STARTTLS on the submission port."""
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.ehlo("client.test")
        c.starttls(context=tls_context())
        c.ehlo("client.test")
        try:
            return c.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error


@pytest.fixture
def srv(tmp_path):
    """A server (cache on, its default TTL) with user alice, running."""
    server = Server(tmp_path)
    server.add_users({"alice@localhost": "old-pw"})
    server.start()
    yield server
    server.shut_down()


def test_passwdTakesEffectAtOnce(srv):
    """After `mailstack user passwd` the remembered old password is refused over SMTP AUTH at once,
    the new one accepted; after `user del` the remembered new one is refused too."""
    for _ in range(2):  # the second login is served from the cache
        assert submission_login(srv, "alice@localhost", "old-pw")[0] == 235
    r = srv.admin("user", "passwd", "alice@localhost", "--password-stdin", input="new-pw\n")
    assert r.returncode == 0, r.stderr
    code, text = submission_login(srv, "alice@localhost", "old-pw")
    assert (code, text[:5]) == (535, b"5.7.8")
    for _ in range(2):
        assert submission_login(srv, "alice@localhost", "new-pw")[0] == 235
    r = srv.admin("user", "del", "alice@localhost")
    assert r.returncode == 0, r.stderr
    code, text = submission_login(srv, "alice@localhost", "new-pw")
    assert (code, text[:5]) == (535, b"5.7.8")
