"""Damaged queue envelopes (queue/store.py): property test over mutated JSON.

A queue envelope damaged in any way (bytes cut or flipped, values replaced by
values of another JSON type) is either read as a well-formed entry that the
manager's scheduler and the admin listing handle without an exception, or is
refused with CorruptEntry and moved, with its message, to ``queue/corrupt/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.admin.queuecmd import summary
from mailstack.queue.schedule import entry_due
from mailstack.queue.store import CorruptEntry, QueueStore
from tests.hostile.support import FAST

QID = "0000000000000d0000000001"

GOOD = {
    "id": QID,
    "sender": "s@remote.example",
    "arrival": 1_700_000_000.0,
    "size": 10,
    "user": "",
    "peer": "",
    "delay_warned": False,
    "version": 1,
    "recipients": [
        {
            "address": "alice@localhost",
            "original": "alice@localhost",
            "local": True,
            "status": "pending",
            "attempts": 1,
            "next_attempt": 1_700_000_060.0,
            "last_reply": "",
            "last_host": "",
            "notified": False,
            "history": [{"time": 1.0, "host": "h", "reply": "451"}],
        }
    ],
}

json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
paths = st.sampled_from(
    [
        ("id",),
        ("sender",),
        ("arrival",),
        ("size",),
        ("user",),
        ("peer",),
        ("delay_warned",),
        ("version",),
        ("recipients",),
    ]
    + [("recipients", 0, k) for k in GOOD["recipients"][0]]
)


def _mutate(doc: dict, path: tuple, value) -> dict:
    doc = json.loads(json.dumps(doc))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


class DamagedEnvelopeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="mailstack-qdamage-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = QueueStore(self.root)
        self.store.recover()

    def check(self, data: bytes) -> None:
        with open(os.path.join(self.root, "env", QID + ".json"), "wb") as f:
            f.write(data)
        with open(os.path.join(self.root, "msg", QID), "wb") as f:
            f.write(b"Subject: x\r\n\r\nx\r\n")
        try:
            entry = self.store.load(QID)
        except CorruptEntry:
            corrupt = os.listdir(os.path.join(self.root, "corrupt"))
            self.assertIn(QID + ".json", corrupt)
            self.assertIn(QID, corrupt)
            self.assertEqual(os.listdir(os.path.join(self.root, "env")), [])
            shutil.rmtree(os.path.join(self.root, "corrupt"))
            return
        # Accepted: everything that reads entries must cope with it.
        entry_due(entry, time.time(), 3600.0)
        entry_due(entry, time.time(), None)
        json.dumps(summary(entry, time.time()))
        self.assertEqual([e.id for e in self.store.scan()], [QID])
        self.store.remove(QID)

    @FAST
    @given(path=paths, value=json_values)
    def test_wrongTypes(self, path: tuple, value) -> None:
        """A field replaced by a JSON value of any type: a usable entry or CorruptEntry, nothing else."""
        self.check(json.dumps(_mutate(GOOD, path, value)).encode())

    @FAST
    @given(cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4))
    def test_damagedBytes(self, cut: int, flips: list) -> None:
        """The envelope truncated and with bytes overwritten: a usable entry or CorruptEntry."""
        data = bytearray(json.dumps(GOOD, indent=1).encode())
        for pos, byte in flips:
            data[pos % len(data)] = byte
        self.check(bytes(data[: max(0, len(data) - cut % len(data))]))
