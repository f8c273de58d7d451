"""Tests for mailstack.dkim.keys: the key store under data_dir/dkim."""

import os
import stat

import dkim
from twisted.trial.unittest import SynchronousTestCase

from mailstack.auth.jsonfile import FileFormatError
from mailstack.dkim import canon, keys, sign

NOW = 1796378400  # 2026-12-04


def signed_message(signing_keys):
    message = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    block, _, body = message.partition(b"\r\n\r\n")
    h = canon.BodyHash()
    h.feed(body)
    return b"".join(sign.sign(canon.header_fields(block + b"\r\n"), h.digest(), signing_keys, NOW)) + message


class KeyStoreTests(SynchronousTestCase):
    def setUp(self):
        self.data = os.path.abspath(self.mktemp())
        self.store = keys.KeyStore(self.data)

    def test_keygenDefaults(self):
        """keygen makes an RSA key with selector <year>a, then <year>b; the key file is 0600."""
        first = self.store.keygen("Example.ORG", now=NOW)
        second = self.store.keygen("example.org", algorithm="ed25519", now=NOW)
        self.assertEqual(
            (first.domain, first.selector, first.algorithm, first.state), ("example.org", "2026a", "rsa", "active")
        )
        self.assertEqual((second.selector, second.algorithm), ("2026b", "ed25519"))
        self.assertTrue(first.record.startswith("v=DKIM1; k=rsa; p=MIIB"))
        self.assertEqual(first.name, "2026a._domainkey.example.org")
        path = os.path.join(self.data, "dkim", "2026a._domainkey.example.org.pem")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual([i.selector for i in self.store.list()], ["2026a", "2026b"])

    def test_refused(self):
        """Bad algorithm, bad or taken selector and a non-domain are refused with KeyStoreError."""
        self.store.keygen("example.org", selector="s1", now=NOW)
        for kwargs in [
            {"domain": "example.org", "algorithm": "dsa"},
            {"domain": "example.org", "selector": "a/b"},
            {"domain": "example.org", "selector": "S1"},
            {"domain": "bad..domain"},
            {"domain": "192.0.2.1"},
        ]:
            self.assertRaises(keys.KeyStoreError, self.store.keygen, **kwargs)

    def test_signingKeysVerify(self):
        """The keys active() returns sign mail that verifies against the records list() gives."""
        self.store.keygen("example.org", now=NOW)
        self.store.keygen("example.org", algorithm="ed25519", now=NOW)
        txt = {f"{i.name}.".encode(): i.record.encode() for i in self.store.list()}
        active = self.store.active("example.org")
        message = signed_message(active)
        d = dkim.DKIM(message)
        self.assertEqual([d.verify(i, dnsfunc=lambda n, timeout=5: txt.get(n)) for i in range(2)], [True, True])

    def test_loadedReadsNoFile(self):
        """loaded() gives None until active() has read the key file, then the same
        keys without reading it; None again once the file is replaced."""
        info = self.store.keygen("example.org", now=NOW)
        self.assertIsNone(self.store.loaded("example.org"))
        active = self.store.active("example.org")
        self.assertEqual(self.store.loaded("example.org"), active)
        self.assertEqual(self.store.loaded("example.net"), [])
        path = os.path.join(self.data, "dkim", f"{info.name}.pem")
        with open(path, "rb") as f:
            pem = f.read()
        os.unlink(path)
        with open(path, "wb") as f:
            f.write(pem)
        self.assertIsNone(self.store.loaded("example.org"))

    def test_retireThenOnlyNewSigns(self):
        """After a rotation (keygen new, retire old) only the new selector signs,
        also in a store object that was open before (a running server)."""
        server = keys.KeyStore(self.data)
        old = self.store.keygen("example.org", now=NOW)
        self.assertEqual([k.selector for k in server.active("example.org")], [old.selector])
        new = self.store.keygen("example.org", now=NOW + 1)
        self.store.retire("example.org", old.selector)
        self.assertEqual([k.selector for k in server.active("example.org")], [new.selector])
        self.assertIn(b"s=2026b;", signed_message(server.active("example.org")))
        self.assertEqual([i.selector for i in server.list()], [new.selector])
        self.assertEqual(
            [(i.selector, i.state) for i in server.list(include_retired=True)],
            [("2026a", "retired"), ("2026b", "active")],
        )

    def test_retireRefused(self):
        """Retiring an unknown key, a retired one, or a domain's last active key is refused."""
        a = self.store.keygen("example.org", now=NOW)
        self.assertRaises(keys.KeyStoreError, self.store.retire, "example.org", a.selector)
        self.assertRaises(keys.KeyStoreError, self.store.retire, "example.org", "nope")
        b = self.store.keygen("example.org", now=NOW)
        self.store.retire("example.org", a.selector)
        self.assertRaises(keys.KeyStoreError, self.store.retire, "example.org", a.selector)
        self.assertEqual([i.selector for i in self.store.list()], [b.selector])

    def test_ensureKeys(self):
        """ensure_keys makes one RSA key per domain lacking one, and nothing the second time."""
        self.store.keygen("example.net", algorithm="ed25519", now=NOW)
        made = self.store.ensure_keys(["example.org", "example.net", "localhost"], now=NOW)
        self.assertEqual([(i.domain, i.algorithm) for i in made], [("example.org", "rsa"), ("localhost", "rsa")])
        self.assertEqual(self.store.ensure_keys(["example.org", "example.net", "localhost"], now=NOW), [])
        self.assertEqual(len(self.store.list()), 3)

    def test_damagedIndex(self):
        """A hand-edited index entry that is no key record is a FileFormatError naming the file."""
        self.store.keygen("example.org", now=NOW)
        path = os.path.join(self.data, "dkim", "keys.json")
        with open(path, "w") as f:
            f.write('{"version": 1, "keys": {"x": {"domain": "example.org"}}}')
        error = self.assertRaises(FileFormatError, keys.KeyStore(self.data).list)
        self.assertIn(path, str(error))

    def test_selectorSequence(self):
        """Default selectors run 2026a..2026z, then 2026aa."""
        names = list(zip(range(28), keys._selectors(2026), strict=False))
        self.assertEqual([n for _, n in names][-3:], ["2026z", "2026aa", "2026ab"])
