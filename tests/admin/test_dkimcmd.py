"""Tests for ``mailstack dkim ...`` and ``mailstack dns-records`` (admin/dkimcmd.py, dnsrecords.py)."""

import io
import json
import os
import time

from twisted.trial.unittest import SynchronousTestCase

from mailstack.admin import cli
from mailstack.dkim.keys import KeyStore


class DKIMCommandTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cfg = os.path.join(self.dir, "m.toml")
        with open(self.cfg, "w") as f:
            f.write(
                'hostname = "mx.example.org"\ndata_dir = "data"\n[domains]\nlocal = ["example.org", "localhost"]\n'
                '[listen]\nsubmission = ["tcp:587"]\nsubmissions = ["ssl:465"]\npop3s = []\n'
            )

    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        try:
            status = cli.main(["--config", self.cfg, *argv], stdin=io.StringIO(), stdout=out, stderr=err, environ={})
        except SystemExit as e:
            status = e.code
        return status, out.getvalue(), err.getvalue()

    def test_keygenPrintsRecord(self):
        """keygen prints the zone-file TXT line of the new key, split into <=255-byte strings."""
        status, out, err = self.run_cli("dkim", "keygen", "Example.ORG")
        self.assertEqual((status, err), (0, ""))
        year = time.gmtime().tm_year
        self.assertTrue(out.startswith(f'{year}a._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=MIIB'), out)
        strings = out.split('"')[1::2]
        self.assertTrue(all(len(s) <= 255 for s in strings))
        self.assertEqual("".join(strings), KeyStore(os.path.join(self.dir, "data")).list()[0].record)

    def test_listAndRetire(self):
        """list --json shows active keys only; retire removes one; the last active key cannot be retired."""
        self.run_cli("dkim", "keygen", "example.org", "--selector", "old")
        self.run_cli("dkim", "keygen", "example.org", "--selector", "new", "--algorithm", "ed25519")
        status, out, _ = self.run_cli("dkim", "list", "--json")
        rows = sorted(json.loads(out), key=lambda r: r["algorithm"])
        self.assertEqual(
            [(r["selector"], r["algorithm"], r["state"]) for r in rows],
            [("new", "ed25519", "active"), ("old", "rsa", "active")],
        )
        self.assertTrue(rows[0]["record"].startswith("v=DKIM1; k=ed25519; p="))
        self.assertEqual(set(rows[0]), {"domain", "selector", "algorithm", "state", "created", "name", "record"})
        self.assertEqual(self.run_cli("dkim", "retire", "example.org", "old")[0], 0)
        status, out, _ = self.run_cli("dkim", "list")
        self.assertEqual([line.split()[:4] for line in out.splitlines()], [["example.org", "new", "ed25519", "active"]])
        status, _, err = self.run_cli("dkim", "retire", "example.org", "new")
        self.assertEqual(status, 1)
        self.assertIn("last active key", err)
        self.assertEqual(err.count("\n"), 1)

    def test_refusals(self):
        """A non-local domain, a taken selector and an unknown key exit 1 with one line; bad usage exits 2."""
        self.run_cli("dkim", "keygen", "example.org", "--selector", "s1")
        for argv in [
            ("dkim", "keygen", "other.example"),
            ("dkim", "keygen", "example.org", "--selector", "s1"),
            ("dkim", "keygen", "example.org", "--selector", "bad_selector"),
            ("dkim", "retire", "example.org", "nope"),
            ("dns-records", "other.example"),
            ("dns-records", "example.org", "--ip", "not-an-ip"),
        ]:
            status, _, err = self.run_cli(*argv)
            self.assertEqual(status, 1, argv)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith("mailstack: "), err)
        self.assertEqual(self.run_cli("dkim", "keygen", "example.org", "--algorithm", "dsa")[0], 2)
        self.assertEqual(self.run_cli("dkim", "retire", "example.org")[0], 2)

    def test_dnsRecords(self):
        """dns-records prints MX, SPF with --ip, each active DKIM key, DMARC, MTA-STS, TLS-RPT and SRV."""
        self.run_cli("dkim", "keygen", "example.org", "--selector", "k1", "--algorithm", "ed25519")
        status, out, err = self.run_cli("dns-records", "example.org", "--ip", "192.0.2.1", "--ip", "2001:db8::1")
        self.assertEqual((status, err), (0, ""))
        lines = [line for line in out.splitlines() if not line.startswith(";")]
        for expected in [
            "example.org. IN MX 10 mx.example.org.",
            'example.org. IN TXT "v=spf1 mx ip4:192.0.2.1 ip6:2001:db8::1 -all"',
            "mx.example.org. IN A 192.0.2.1",
            "mx.example.org. IN AAAA 2001:db8::1",
            '_dmarc.example.org. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"',
            '_smtp._tls.example.org. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.org"',
            "_submission._tcp.example.org. IN SRV 0 1 587 mx.example.org.",
            "_submissions._tcp.example.org. IN SRV 0 1 465 mx.example.org.",
            "_pop3s._tcp.example.org. IN SRV 0 0 0 .",
        ]:
            self.assertIn(expected, lines)
        self.assertTrue(
            any(line.startswith('k1._domainkey.example.org. IN TXT "v=DKIM1; k=ed25519; p=') for line in lines)
        )
        self.assertTrue(any(line.startswith('_mta-sts.example.org. IN TXT "v=STSv1; id=') for line in lines))
        self.assertIn("https://mta-sts.example.org/.well-known/mta-sts.txt", out)
        self.assertIn("p=reject", out)  # the advice on moving on from quarantine

    def test_dnsRecordsJSON(self):
        """--json gives the records unsplit and the MTA-STS policy with its URL; retired keys are left out."""
        self.run_cli("dkim", "keygen", "example.org", "--selector", "a")
        self.run_cli("dkim", "keygen", "example.org", "--selector", "b")
        self.run_cli("dkim", "retire", "example.org", "a")
        status, out, _ = self.run_cli("dns-records", "example.org", "--json")
        self.assertEqual(status, 0)
        doc = json.loads(out)
        names = [r["name"] for r in doc["records"] if "_domainkey" in r["name"]]
        self.assertEqual(names, ["b._domainkey.example.org"])
        self.assertEqual(doc["mta_sts_policy"]["url"], "https://mta-sts.example.org/.well-known/mta-sts.txt")
        policy = dict(line.split(": ", 1) for line in doc["mta_sts_policy"]["text"].splitlines())
        self.assertEqual(policy["version"], "STSv1")
        self.assertEqual(policy["mx"], "mx.example.org")
        sts = next(r for r in doc["records"] if r["name"] == "_mta-sts.example.org")
        self.assertRegex(sts["value"], r"^v=STSv1; id=[A-Za-z0-9]{1,32}$")
