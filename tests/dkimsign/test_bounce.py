"""The server's own DSNs are DKIM-signed when their From domain (our hostname) is local."""

from __future__ import annotations

import os
import random

import dkim
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.dkim import keys, signer
from mailstack.errors import Reply
from mailstack.queue.manager import QueueManager
from tests.queue.outbound_fakes import (
    FakeAgent,
    FakeIntake,
    FakeStore,
    entry,
    make_config,
    run_blocking,
)

PERM = Reply(550, "5.1.1", "no such user")
START = 1_000_000.0


class BounceSigningTests(SynchronousTestCase):
    def bounce(self, local_domain: str) -> tuple[bytes, keys.KeyStore]:
        clock = Clock()
        clock.advance(START)
        store = FakeStore(self.mktemp())
        remote = FakeAgent()
        remote.store = store
        remote.script = lambda e, rs: {r.address: PERM for r in rs}
        intake = FakeIntake()
        key_store = keys.KeyStore(os.path.abspath(self.mktemp()))
        key_store.ensure_keys(["mx.test"], now=START)
        m = QueueManager(store, FakeAgent(), remote, clock, make_config(), run_blocking, intake, rng=random.Random(1))
        m.bounces.signer = signer.DKIMSigner(key_store, lambda d: d == local_domain)
        m.startService()
        self.addCleanup(lambda: m.running and m.stopService())
        entry(store, "R", "s@here.test", ["bad@remote.test"], arrival=START)
        m.kick("R")
        self.assertEqual(len(intake.messages), 1)
        return intake.messages[0][1], key_store

    def test_dsnSignedAndVerifies(self) -> None:
        """A DSN from MAILER-DAEMON@<local hostname> carries a signature dkimpy verifies."""
        message, key_store = self.bounce("mx.test")
        self.assertTrue(message.startswith(b"DKIM-Signature: "))
        txt = {f"{i.name}.".encode(): i.record.encode() for i in key_store.list()}
        self.assertTrue(dkim.verify(message, dnsfunc=lambda name, timeout=5: txt.get(name)))

    def test_foreignHostnameNotSigned(self) -> None:
        """When the hostname's domain is not local, the DSN goes out unsigned."""
        message, _ = self.bounce("other.test")
        self.assertNotIn(b"DKIM-Signature", message)
