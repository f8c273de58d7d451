"""Hostile addresses through the admin command (admin/cli.py): one line and exit 1, never a traceback.

Every address form the address fuzzers use, given to ``user add``, ``alias add``
(as alias and as target) and ``user del``: either accepted, in which case the
stored key reads back and names a mailbox inside data_dir (users) or parses
(alias targets), or refused with exit status 1 and exactly one line on stderr.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

from hypothesis import given, settings
from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import mailbox_components, parse_address
from mailstack.admin import cli
from tests.hostile.support import FAST
from tests.hostile.test_parsers_hostile import address_text

# Every example runs the admin command (and a password hash) several times.
FAST = settings(FAST, max_examples=20)

KNOWN = ['"../../evil"@localhost', '"a/b"@localhost', '"x y"@remote.example', '"\\\\"@localhost', "..@localhost",
         '"."@localhost', "x@[127.0.0.1]", "ünï@localhost", "a@localhost.", "@localhost", "a@", "a\x00b@localhost",
         "a@b@localhost", '"a@b"@localhost', "a\n@localhost"]


class AdminHostileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mailstack-admin-hostile-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.cfg = os.path.join(self.dir, "m.toml")
        with open(self.cfg, "w") as f:
            f.write('data_dir = "data"\n[domains]\nlocal = ["localhost"]\n')

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        try:
            status = cli.main(["--config", self.cfg, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err,
                              environ={})
        except SystemExit as e:  # argparse: bad usage
            status = int(e.code or 0)
        return status, out.getvalue(), err.getvalue()

    def check(self, address: str) -> None:
        for argv in (("user", "add", address, "--password-stdin"), ("alias", "add", address, "alice@localhost"),
                     ("alias", "add", "fwd@localhost", address), ("user", "del", address)):
            status, _, err = self.run_cli(*argv, stdin="pw\n")
            self.assertNotIn("Traceback", err)
            if status == 0:
                continue
            self.assertIn(status, (1, 2), (argv, err))
            if status == 1:
                self.assertEqual(err.count("\n"), 1, (argv, err))
                self.assertTrue(err.startswith("mailstack: "), err)
        data = os.path.join(self.dir, "data")
        users = {}
        if os.path.exists(os.path.join(data, "users.json")):
            with open(os.path.join(data, "users.json")) as f:
                users = json.load(f)["users"]
        for key in users:
            domain, local = mailbox_components(parse_address(key))
            self.assertEqual(len({domain, local} & {".", "..", ""}), 0)
        if os.path.exists(os.path.join(data, "aliases.json")):
            with open(os.path.join(data, "aliases.json")) as f:
                aliases = json.load(f)["aliases"]
            for key, targets in aliases.items():
                for text in [key, *targets]:
                    self.assertEqual(parse_address(text).key, text)

    def test_knownHostileForms(self) -> None:
        """Traversal, quoting, literals, controls and 8-bit: accepted safely or refused in one line."""
        for address in KNOWN:
            self.check(address)

    @FAST
    @given(text=address_text)
    def test_fuzzedAddresses(self, text: str) -> None:
        """Fuzzed address text (alone and @localhost): accepted safely or refused in one line."""
        if "\x00" in text:
            return  # argv cannot carry NUL
        self.check(text)
        self.check(text + "@localhost")
