"""Keys at first start: every local domain gets an active key, logged with its TXT record."""

from __future__ import annotations

import os
import stat

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailstack import config as configmod
from mailstack.dkim import keys, startup
from tests.support.fakes import run_blocking


class StartupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_keysMadeAndLogged(self) -> None:
        """Starting makes one RSA key per local domain (0600 under data_dir/dkim) and logs name and record."""
        data_dir = os.path.abspath(self.mktemp())
        cfg = configmod.from_mapping({"data_dir": data_dir, "domains": {"local": ["a.test", "b.test"]}})
        signer = startup.signer(cfg)
        svc = startup.KeysService(run_blocking, signer.keys, cfg.domains.local)
        svc.startService()
        self.successResultOf(svc.done)
        made = signer.keys.list()
        self.assertEqual([(k.domain, k.algorithm) for k in made], [("a.test", "rsa"), ("b.test", "rsa")])
        for k in made:
            path = os.path.join(data_dir, "dkim", f"{k.name}.pem")
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        logged = [e for e in self.events if e.get("log_format", "").startswith("dkim: new")]
        self.assertEqual([(e["name"], e["record"]) for e in logged], [(k.name, k.record) for k in made])
        # A second start makes nothing new.
        svc2 = startup.KeysService(run_blocking, signer.keys, cfg.domains.local)
        svc2.startService()
        self.successResultOf(svc2.done)
        self.assertEqual(signer.keys.list(), made)

    def test_failureLoggedNotRaised(self) -> None:
        """A key store that cannot be written is logged; the start goes on."""

        class FullDisk(keys.KeyStore):
            def ensure_keys(self, domains, now=None):
                raise OSError(28, "No space left on device")

        svc = startup.KeysService(run_blocking, FullDisk(os.path.abspath(self.mktemp())), ["a.test"])
        svc.startService()
        self.assertIsNone(self.successResultOf(svc.done))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
