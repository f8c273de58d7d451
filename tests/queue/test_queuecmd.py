"""``mailstack queue list|show|flush|delete`` on a real queue directory."""

from __future__ import annotations

import io
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from mailstack.admin import cli
from mailstack.queue.entry import FAILED, QueueEntry, RecipientState
from mailstack.queue.locks import save_unless_deleted
from mailstack.queue.store import QueueStore


class QueueCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.conf = os.path.join(self.dir, "mailstack.toml")
        with open(self.conf, "w") as f:
            f.write('hostname = "mx.test"\ndata_dir = "data"\n')
        self.store = QueueStore(os.path.join(self.dir, "data", "queue"))

    def add(self, sender="s@here.test", rcpts=("a@remote.test",)) -> QueueEntry:
        qid = self.store.new_id()
        with self.store.open_tmp(qid) as f:
            f.write(b"Received: by mx.test\r\nSubject: hello\r\n\r\nbody\r\n")
        e = QueueEntry(
            id=qid, sender=sender, arrival=1_700_000_000.0, size=50,
            recipients=[RecipientState(address=r, original=r, local=False) for r in rcpts],
        )
        self.store.commit(e)
        return e

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", self.conf, "queue", *argv], stdout=out, stderr=err, environ={})
        return code, out.getvalue(), err.getvalue()

    def test_listEmpty(self) -> None:
        """An empty (even missing) queue lists as empty."""
        code, out, _ = self.run_cli("list", "--json")
        self.assertEqual((code, json.loads(out)), (0, []))
        self.assertEqual(self.run_cli("list")[1].strip(), "queue is empty")

    def test_listJson(self) -> None:
        """list --json: id, age, sender, recipients with state, attempts, next try, last error."""
        e = self.add(rcpts=("a@remote.test", "b@remote.test"))
        e.recipients[0].attempts = 2
        e.recipients[0].next_attempt = 1_700_000_600.0
        e.recipients[0].last_reply = "451 4.4.1 Connection to the remote server failed"
        e.recipients[1].status = FAILED
        self.store.save(e)
        code, out, _ = self.run_cli("list", "--json")
        self.assertEqual(code, 0)
        (row,) = json.loads(out)
        self.assertEqual(row["id"], e.id)
        self.assertEqual(row["sender"], "s@here.test")
        self.assertEqual(row["attempts"], 2)
        self.assertEqual(row["next_attempt"], "2023-11-14T22:23:20Z")
        self.assertEqual(row["last_error"], "451 4.4.1 Connection to the remote server failed")
        self.assertEqual([r["status"] for r in row["recipients"]], ["pending", "failed"])
        self.assertGreater(row["age"], 0)
        code, text, _ = self.run_cli("list")
        self.assertIn(e.id, text)
        self.assertIn("<a@remote.test>", text)

    def test_show(self) -> None:
        """show ID prints the envelope, each recipient and the headers."""
        e = self.add()
        code, out, _ = self.run_cli("show", e.id)
        self.assertEqual(code, 0)
        self.assertIn("Subject: hello", out)
        self.assertIn("<a@remote.test>", out)
        data = json.loads(self.run_cli("show", e.id, "--json")[1])
        self.assertEqual(data["id"], e.id)

    def test_messageInsideItsEnvelope(self) -> None:
        """An entry whose message is inside its envelope: list shows no message field, show prints its headers,
        hold and release keep the message, delete removes the one file."""
        qid = self.store.new_id()
        body = b"Received: by mx.test\r\nSubject: inline\r\n\r\nbody\r\n"
        e = QueueEntry(id=qid, sender="s@here.test", arrival=1_700_000_000.0, size=len(body),
                       recipients=[RecipientState(address="a@remote.test", original="a@remote.test", local=False)])
        self.store.commit(e, body)
        (row,) = json.loads(self.run_cli("list", "--json")[1])
        self.assertEqual((row["id"], "message" in row), (qid, False))
        self.assertIn("Subject: inline", self.run_cli("show", qid)[1])
        self.assertIn("Subject: inline", json.loads(self.run_cli("show", qid, "--json")[1])["headers"])
        self.assertEqual(self.run_cli("hold", qid)[0], 0)
        self.assertTrue(self.store.load(qid).held)
        self.assertEqual(self.run_cli("release", qid)[0], 0)
        self.assertEqual(self.store.load_message(qid)[1], body)
        self.assertEqual(self.run_cli("delete", qid)[0], 0)
        self.assertEqual(os.listdir(os.path.join(self.store.root, "env")), [])

    def test_showDsnRequests(self) -> None:
        """show prints the DSN requests (RET, ENVID; NOTIFY, ORCPT per recipient) and SMTPUTF8, escaped."""
        e = self.add()
        e.ret, e.envid, e.smtputf8 = "HDRS", "env\x1b1", True
        e.recipients[0].notify, e.recipients[0].orcpt = ["SUCCESS", "DELAY"], "rfc822;Orig@x.test"
        self.store.save(e)
        out = self.run_cli("show", e.id)[1]
        self.assertIn("DSN:       RET=HDRS ENVID=env\\x1b1", out)
        self.assertIn("SMTPUTF8:  yes", out)
        self.assertIn("NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Orig@x.test", out)

    def test_unknownId(self) -> None:
        """show/delete of an unknown id: exit 1 with one line on stderr."""
        for cmd in ("show", "delete"):
            code, _, err = self.run_cli(cmd, "0" * 24)
            self.assertEqual(code, 1)
            self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertEqual(self.run_cli("show", "../etc")[0], 1)

    def test_delete(self) -> None:
        """delete removes envelope and message; the manager cannot write it back."""
        e = self.add()
        code, out, _ = self.run_cli("delete", e.id)
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(self.run_cli("list", "--json")[1]), [])
        self.assertFalse(os.path.exists(self.store.message_path(e.id)))
        self.assertFalse(save_unless_deleted(self.store, e))
        self.assertEqual(list(self.store.scan()), [])

    def test_flush(self) -> None:
        """flush leaves the trigger the manager consumes."""
        self.assertEqual(self.run_cli("flush")[0], 0)
        self.assertTrue(self.store.flush_requested())
        self.assertFalse(self.store.flush_requested())

    def test_holdAndRelease(self) -> None:
        """hold ID marks the entry held (list, list --json and show say so); release ID
        clears it and leaves a kick request for the running manager; --all does every entry."""
        e, other = self.add(), self.add()
        self.assertEqual(self.run_cli("hold", e.id), (0, f"held {e.id}\n", ""))
        self.assertEqual(self.run_cli("hold", e.id)[1], f"{e.id}: already held\n")
        rows = {r["id"]: r["held"] for r in json.loads(self.run_cli("list", "--json")[1])}
        self.assertEqual(rows, {e.id: True, other.id: False})
        self.assertIn("HELD", self.run_cli("list")[1])
        self.assertIn("held:", self.run_cli("show", e.id)[1])
        self.assertEqual(self.run_cli("release", e.id), (0, f"released {e.id}\n", ""))
        self.assertEqual(self.store.kicks_requested(), [e.id])
        self.assertFalse(self.store.load(e.id).held)
        self.assertEqual(self.run_cli("hold", "--all")[1], "held 2 entries\n")
        self.assertEqual(self.run_cli("release", "--all")[1], "released 2 entries\n")
        self.assertEqual(self.run_cli("hold")[0], 1)  # neither ID nor --all
        self.assertEqual(self.run_cli("hold", "0" * 24)[0], 1)

    def test_oldEnvelopeWithoutHoldFields(self) -> None:
        """An envelope written before holds existed (no held_* keys) still reads as not held."""
        e = self.add()
        path = self.store.envelope_path(e.id)
        with open(path) as f:
            data = json.load(f)
        del data["held_since"], data["held_time"]
        with open(path, "w") as f:
            json.dump(data, f)
        self.assertFalse(self.store.load(e.id).held)
        self.assertEqual(json.loads(self.run_cli("list", "--json")[1])[0]["held"], False)

    def test_usage(self) -> None:
        """A missing subcommand is bad usage (exit 2)."""
        with self.assertRaises(SystemExit) as cm:
            cli.main(["--config", self.conf, "queue"], stdout=io.StringIO(), stderr=io.StringIO(), environ={})
        self.assertEqual(cm.exception.code, 2)

    def test_listManyOldestFirst(self) -> None:
        """list --json is a JSON array of every entry, oldest arrival first; the text
        listing has one header line per entry and the count."""
        entries = [self.add(rcpts=(f"r{i}@remote.test",)) for i in range(7)]
        entries[0].arrival = 1_700_000_100.0  # arrived last after all
        self.store.save(entries[0])
        code, out, _ = self.run_cli("list", "--json")
        rows = json.loads(out)
        self.assertEqual([r["id"] for r in rows], [e.id for e in entries[1:]] + [entries[0].id])
        self.assertEqual(rows[-1]["arrival"], "2023-11-14T22:15:00Z")
        code, text, _ = self.run_cli("list")
        self.assertEqual(code, 0)
        self.assertEqual(sum(1 for line in text.splitlines() if line[:24] in {e.id for e in entries}), 7)
        self.assertIn("7 message(s) in the queue", text)

    def test_listDamagedEnvelopes(self) -> None:
        """An envelope that is not valid JSON, or has a field of the wrong type, is not
        listed but moved to corrupt/ (as scan() does); the others are listed."""
        good = self.add()
        broken = self.add()
        wrong = self.add()
        with open(self.store.envelope_path(broken.id), "wb") as f:
            f.write(b'{"id": ')
        data = json.loads(open(self.store.envelope_path(wrong.id), "rb").read())
        data["recipients"][0]["attempts"] = True  # a bool is no attempt count
        with open(self.store.envelope_path(wrong.id), "w") as f:
            json.dump(data, f)
        code, out, _ = self.run_cli("list", "--json")
        self.assertEqual([r["id"] for r in json.loads(out)], [good.id])
        corrupt = os.listdir(os.path.join(self.store.root, "corrupt"))
        self.assertIn(broken.id + ".json", corrupt)
        self.assertIn(wrong.id + ".json", corrupt)

    def test_listUnusualButValid(self) -> None:
        """An envelope that is unusual but valid (a version written as 1.0) is listed."""
        e = self.add()
        data = json.loads(open(self.store.envelope_path(e.id), "rb").read())
        data["version"] = 1.0
        data["arrival"] = 1_700_000_000
        with open(self.store.envelope_path(e.id), "w") as f:
            json.dump(data, f)
        (row,) = json.loads(self.run_cli("list", "--json")[1])
        self.assertEqual((row["id"], row["arrival"]), (e.id, "2023-11-14T22:13:20Z"))
