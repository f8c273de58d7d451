"""End to end: the `mailstack` admin command as an operator runs it."""

import json
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.harness import Server


def test_acceptance(tmp_path):
    """Issue 2's acceptance list for users, without a running server."""
    server = Server(tmp_path)
    out = server.admin("user", "add", "alice@localhost", "--password-stdin", input="secret\n")
    assert out.returncode == 0, out.stderr
    listed = server.admin("user", "list", "--json")
    assert [u["address"] for u in json.loads(listed.stdout)] == ["alice@localhost"]
    again = server.admin("user", "add", "alice@localhost", "--password-stdin", input="secret\n")
    assert again.returncode == 1
    assert len(again.stderr.splitlines()) == 1
    for unsafe in ("../x@localhost", "a/b@localhost"):
        bad = server.admin("user", "add", unsafe, "--password-stdin", input="secret\n")
        assert bad.returncode == 1
        assert bad.stderr.startswith(f"mailstack: {unsafe}: ")
        assert len(bad.stderr.splitlines()) == 1
    assert server.admin("user", "frobnicate").returncode == 2
    assert server.admin("check-config").returncode == 0


def test_parallelAddsLoseNothing(tmp_path):
    """20 `user add` processes at once leave exactly 20 users."""
    server = Server(tmp_path)
    names = [f"user{i}@localhost" for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(
            pool.map(lambda n: server.admin("user", "add", n, "--password-stdin", input="pw\n", timeout=120), names)
        )
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results]
    listed = json.loads(server.admin("user", "list", "--json").stdout)
    assert sorted(u["address"] for u in listed) == sorted(names)


def test_runningServerSeesNewUser(tmp_path):
    """A user added while the server runs can log in to POP3 without a restart."""
    import poplib

    server = Server(tmp_path, extra_toml="[auth]\nplaintext_on_loopback = true\n")
    server.start()
    try:
        assert server.admin("user", "add", "bob@localhost", "--password-stdin", input="pw\n").returncode == 0
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        pop.user("bob@localhost")
        pop.pass_("pw")
        assert pop.stat()[0] == 0
        pop.quit()
        server.stop()
    finally:
        server.kill()
