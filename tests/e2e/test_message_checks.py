"""End to end: message checks in the running server, a third-party plugin and the loop rule."""

from __future__ import annotations

import importlib.util
import os
import smtplib
import textwrap

import pytest
from zope.interface.verify import verifyObject

from mailstack.interfaces import IMessageCheck
from mailstack.pipeline import ICheckFactory
from tests.e2e.harness import Server
from tests.e2e.test_smtp import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme_blocks() -> tuple[str, str]:
    """The plugin module and the config lines of README.rst, "Writing a check"."""
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
        section = f.read().split("Writing a check\n---------------\n", 1)[1]
    blocks = []
    for part in section.split("::\n\n")[1:3]:
        lines = []
        for line in part.splitlines():
            if line and not line.startswith("    "):
                break
            lines.append(line)
        blocks.append(textwrap.dedent("\n".join(lines)))
    return blocks[0], blocks[1]


PLUGIN, CONFIG = readme_blocks()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A server with README's example plugin on its PYTHONPATH, enabled as README says; user alice."""
    root = tmp_path_factory.mktemp("pipeline")
    plugins = root / "site" / "mailstack" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "subjectword.py").write_text(PLUGIN)
    (root / "server").mkdir()
    server = Server(root / "server", CONFIG, python_path=(str(root / "site"),))
    server.add_users({"alice@localhost": "alice-pw"})
    server.start()
    yield server
    server.shut_down()


def test_readmePluginProvidesTheInterfaces(tmp_path):
    """README's example factory and the check it builds verify against their interfaces."""
    path = tmp_path / "subjectword.py"
    path.write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("subjectword_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    verifyObject(ICheckFactory, module.subjectword)
    verifyObject(IMessageCheck, module.subjectword.build(None, {"words": ["lottery"]}))
    with pytest.raises(ValueError):
        module.subjectword.build(None, {"words": "lottery"})


def send(server: Server, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as c:
        c.sendmail("someone@remote.test", ["alice@localhost"], message)


def test_pluginRefusesMatchingSubject(srv):
    """The plugin's check refuses a Subject with the word (550 5.7.1) and nothing is delivered."""
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(srv, b"Subject: You won the LOTTERY\r\n\r\nrefused-marker\r\n")
    assert e.value.smtp_code == 550
    assert e.value.smtp_error.startswith(b"5.7.1 Message refused by content policy")
    srv.wait_for_log("check subjectword refused data")


def test_pluginLetsOtherMailThroughWithItsHeader(srv):
    """Other mail is delivered, with the plugin's field right after our Received:."""
    send(srv, b"Subject: lunch\r\n\r\ndelivered-marker\r\n")
    [found] = wait_for(srv, "alice@localhost", b"delivered-marker")
    head = found.partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    assert lines[2].startswith(b"Received: ")
    assert b"\r\nX-Subject-Checked: yes\r\nSubject: lunch" in head
    assert wait_for(srv, "alice@localhost", b"refused-marker", timeout=0.5) == []


def test_loopRefusesMoreThanFiftyReceived(srv):
    """51 Received: fields are refused 554 5.4.6 (RFC 5321 section 6.3); 50 are delivered."""
    hop = b"Received: from a.test by b.test; Mon, 1 Dec 2025 10:00:00 +0000\r\n"
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(srv, hop * 51 + b"Subject: loop\r\n\r\nloop-51\r\n")
    assert (e.value.smtp_code, e.value.smtp_error[:5]) == (554, b"5.4.6")
    send(srv, hop * 50 + b"Subject: fine\r\n\r\nloop-50\r\n")
    assert len(wait_for(srv, "alice@localhost", b"loop-50")) == 1
    assert wait_for(srv, "alice@localhost", b"loop-51", timeout=0.5) == []


def test_unknownCheckStopsTheStart(tmp_path):
    """A check name no plugin provides stops the start with one line naming the key."""
    server = Server(tmp_path, '[pipeline]\nchecks = ["nosuch"]\n')
    with pytest.raises(AssertionError):
        server.start(timeout=30)
    with open(server.output_path, encoding="utf-8") as f:
        output = f.read()
    assert "pipeline.checks: no check named 'nosuch'" in output
    assert "Traceback" not in output
