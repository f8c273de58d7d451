"""``mailstack queue list|show`` print peer-supplied text with control characters escaped."""

from __future__ import annotations

import io
import os

from twisted.trial.unittest import SynchronousTestCase

from mailstack.admin import cli
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.queue.store import QueueStore

ESC = "\x1b"


class QueueOutputEscapedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.conf = os.path.join(self.dir, "mailstack.toml")
        with open(self.conf, "w") as f:
            f.write('hostname = "mx.test"\ndata_dir = "data"\n')
        store = QueueStore(os.path.join(self.dir, "data", "queue"))
        self.id = store.new_id()
        with store.open_tmp(self.id) as f:
            f.write(b"Subject: \x1b]0;owned\x07hi\r\nX-Evil: a\rb\xc2\x9bc\r\n\r\nbody\r\n")
        rcpt = RecipientState(address="a@remote.test", original="a@remote.test", local=False)
        rcpt.last_host = "mx.remote.test"
        rcpt.last_reply = "451 4.3.0 \x1b[2Jcleared\r\n250 fake"
        rcpt.history.append({"time": 1_700_000_100.0, "host": "mx\x1b.remote.test", "reply": "451 \x1b[31mred"})
        entry = QueueEntry(
            id=self.id, sender="s\x1b[1m@here.test", arrival=1_700_000_000.0, size=50, recipients=[rcpt],
            peer="192.0.2.1", user="alice\x1b@here.test",
        )
        store.commit(entry)

    def run_cli(self, *argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", self.conf, "queue", *argv], stdout=out, stderr=err, environ={})
        self.assertEqual(code, 0, err.getvalue())
        return out.getvalue()

    def assertNoControls(self, text: str) -> None:
        for line in text.split("\n"):
            self.assertFalse([c for c in line if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F], line)

    def test_listEscapesReplyAndSender(self) -> None:
        """queue list shows the remote reply and the sender with ESC, CR and LF as visible escapes."""
        out = self.run_cli("list")
        self.assertNoControls(out)
        self.assertIn("<s\\x1b[1m@here.test>", out)
        self.assertIn("451 4.3.0 \\x1b[2Jcleared\\r\\n250 fake", out)

    def test_showEscapesHeadersAndHistory(self) -> None:
        """queue show escapes header lines (a bare CR, a C1 CSI, OSC), history replies and the user."""
        out = self.run_cli("show", self.id)
        self.assertNoControls(out)
        self.assertIn("Subject: \\x1b]0;owned\\x07hi", out)
        self.assertIn("X-Evil: a\\rb\\x9bc", out)
        self.assertIn("mx\\x1b.remote.test  451 \\x1b[31mred", out)
        self.assertIn("user:      alice\\x1b@here.test", out)
