"""Router: local users, aliases (chains, loops, remote targets), postmaster, relay policy."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack import config
from mailstack.address import parse_address
from mailstack.envelope import Destination
from mailstack.errors import PermanentFailure
from mailstack.interfaces import IAliasDB, IRouter, IUserDB
from mailstack.routing import Router


@implementer(IUserDB)
class Users:
    def __init__(self, keys) -> None:
        self._keys = sorted(keys)

    def exists(self, key: str) -> bool:
        return key in self._keys

    def check_password(self, key: str, password: bytes) -> bool:
        return False

    def stored_hash(self, key: str) -> str | None:
        return None

    def keys(self) -> list[str]:
        return list(self._keys)


@implementer(IAliasDB)
class Aliases:
    def __init__(self, table) -> None:
        self._table = table

    def targets(self, key: str):
        return self._table.get(key)


CONFIG = config.from_mapping({"domains": {"local": ["example.org", "example.net"]}})
USERS = ["bob@example.org", "alice@example.org", "zed@example.net"]
ALIASES = {
    "team@example.org": ["bob@example.org", "Alice@Example.org"],
    "fwd@example.org": ["Someone@Remote.example"],
    "mixed@example.org": ["bob@example.org", "x@remote.example", "team@example.org"],
    "chain1@example.org": ["chain2@example.org"],
    "chain2@example.org": ["chain3@example.org"],
    "chain3@example.org": ["zed@example.net"],
    "loop1@example.org": ["loop2@example.org"],
    "loop2@example.org": ["loop1@example.org"],
    "leaky@example.org": ["leaky2@example.org", "bob@example.org"],
    "leaky2@example.org": ["leaky@example.org"],
    "bob2@example.org": ["bob2@example.org"],
    "keepcopy@example.org": [],
    "alice@example.org": ["alice@example.org", "alice@remote.example"],
    "dangling@example.org": ["nobody@example.org"],
    "bad@example.org": ["not an address", "bob@example.org"],
    "diamond@example.org": ["d1@example.org", "d2@example.org"],
    "d1@example.org": ["d3@example.org"],
    "d2@example.org": ["d3@example.org"],
    "d3@example.org": ["bob@example.org"],
    "postmaster@example.net": ["zed@example.net", "ops@remote.example"],
    "abuse@example.org": ["postmaster@example.org"],
}


def router(users=USERS, aliases=ALIASES) -> Router:
    return Router(CONFIG, Users(users), Aliases(aliases))


def finals(destinations: list[Destination]) -> list[tuple[str, bool]]:
    return [(str(d.address), d.local) for d in destinations]


class RouterTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """Router provides IRouter."""
        verifyObject(IRouter, router())

    def test_table(self) -> None:
        """Each address resolves to its final destinations, in order, without duplicates."""
        table = [
            # (recipient, authenticated, expected [(address, local)])
            ("bob@example.org", False, [("bob@example.org", True)]),
            ("BOB@EXAMPLE.ORG", False, [("bob@example.org", True)]),
            (
                "team@example.org",
                False,
                [("bob@example.org", True), ("alice@example.org", True), ("alice@remote.example", False)],
            ),
            ("fwd@example.org", False, [("Someone@remote.example", False)]),
            (
                "mixed@example.org",
                False,
                [
                    ("bob@example.org", True),
                    ("x@remote.example", False),
                    ("alice@example.org", True),
                    ("alice@remote.example", False),
                ],
            ),
            ("chain1@example.org", False, [("zed@example.net", True)]),
            ("leaky@example.org", False, [("bob@example.org", True)]),
            ("alice@example.org", False, [("alice@example.org", True), ("alice@remote.example", False)]),
            ("bad@example.org", False, [("bob@example.org", True)]),
            ("diamond@example.org", False, [("bob@example.org", True)]),
            ("someone@remote.example", True, [("someone@remote.example", False)]),
            ("Case@Remote.Example", True, [("Case@remote.example", False)]),
            ("x@[192.0.2.1]", True, [("x@[192.0.2.1]", False)]),
            ("postmaster@example.net", False, [("zed@example.net", True), ("ops@remote.example", False)]),
            ("POSTMASTER@example.org", False, [("postmaster@example.org", True)]),
            ("abuse@example.org", False, [("postmaster@example.org", True)]),
        ]
        r = router()
        for text, authenticated, expected in table:
            address = parse_address(text)
            destinations = r.resolve(address, authenticated)
            self.assertEqual(finals(destinations), expected, text)
            self.assertTrue(all(d.original == address for d in destinations), text)

    def test_refusals(self) -> None:
        """Unknown local users 550 5.1.1, relaying 550 5.7.1, pure loops 550 5.4.6."""
        table = [
            ("nobody@example.org", False, (550, "5.1.1")),
            ("nobody@example.org", True, (550, "5.1.1")),
            ("dangling@example.org", False, (550, "5.1.1")),
            ("keepcopy@example.org", False, (550, "5.1.1")),
            ("someone@remote.example", False, (550, "5.7.1")),
            ("x@[192.0.2.1]", False, (550, "5.7.1")),
            ("x@[127.0.3.2]", False, (550, "5.7.1")),
            ("x@[127.0.3.2]", True, (553, "5.7.1")),
            ("x@[10.0.0.1]", True, (553, "5.7.1")),
            ("x@[169.254.169.254]", True, (553, "5.7.1")),
            ("x@[IPv6:fe80::1]", True, (553, "5.7.1")),
            ("x@[IPv6:::1]", True, (553, "5.7.1")),
            ("loop1@example.org", False, (550, "5.4.6")),
            ("loop1@example.org", True, (550, "5.4.6")),
        ]
        r = router()
        for text, authenticated, expected in table:
            failure = self.assertRaises(PermanentFailure, r.resolve, parse_address(text), authenticated)
            self.assertEqual((failure.reply.code, failure.reply.enhanced), expected, text)

    def test_privateLiteralsAllowedByConfig(self) -> None:
        """With relay.allow_private_literals an authenticated client may relay to [10.0.0.1]."""
        cfg = config.from_mapping({"domains": {"local": ["example.org"]}, "relay": {"allow_private_literals": True}})
        r = Router(cfg, Users(USERS), Aliases(ALIASES))
        destinations = r.resolve(parse_address("x@[10.0.0.1]"), True)
        self.assertEqual(finals(destinations), [("x@[10.0.0.1]", False)])

    def test_selfReferenceKeepsCopyOfUser(self) -> None:
        """An alias naming itself delivers to the user of that name (no loop error)."""
        r = router(users=USERS + ["bob2@example.org"])
        self.assertEqual(finals(r.resolve(parse_address("bob2@example.org"), False)), [("bob2@example.org", True)])

    def test_pureSelfLoop(self) -> None:
        """An alias naming only itself, with no such user, is a routing loop."""
        failure = self.assertRaises(PermanentFailure, router().resolve, parse_address("bob2@example.org"), False)
        self.assertEqual(failure.reply.enhanced, "5.4.6")

    def test_postmasterWithoutAliasKeptApart(self) -> None:
        """Without alias or user, postmaster@ goes to its own Maildir, never to another user's."""
        address = parse_address("PostMaster@example.net")
        for users in (["b@example.net", "a@example.net", "a@example.org"], ["a@example.org"], []):
            self.assertEqual(
                finals(router(users=users, aliases={}).resolve(address, False)),
                [("postmaster@example.net", True)],
                users,
            )

    def test_postmasterAliasYieldingNothingFallsBack(self) -> None:
        """A postmaster alias that leads nowhere still lets postmaster@ resolve, to its own Maildir."""
        aliases = {"postmaster@example.org": ["nobody@example.org"]}
        postmaster = parse_address("postmaster@example.org")
        resolved = router(users=["bob@example.org"], aliases=aliases).resolve(postmaster, False)
        self.assertEqual(finals(resolved), [("postmaster@example.org", True)])

    def test_postmasterUserIsItself(self) -> None:
        """A real postmaster user gets its own mail."""
        resolved = router(users=["a@example.org", "postmaster@example.org"], aliases={}).resolve(
            parse_address("Postmaster@example.org"), False
        )
        self.assertEqual(finals(resolved), [("postmaster@example.org", True)])

    def test_postmasterOfRemoteDomainIsRemote(self) -> None:
        """postmaster@ a remote domain is relaying like any remote address."""
        remote = parse_address("postmaster@remote.example")
        failure = self.assertRaises(PermanentFailure, router().resolve, remote, False)
        self.assertEqual(failure.reply.enhanced, "5.7.1")

    def test_linearOnWideAliasGraphs(self) -> None:
        """A layered alias graph with 2**30 paths expands quickly (each alias once)."""
        aliases = {f"l{i}@example.org": [f"l{i + 1}@example.org", f"m{i + 1}@example.org"] for i in range(30)}
        aliases.update({f"m{i}@example.org": [f"l{i}@example.org"] for i in range(1, 31)})
        aliases["l30@example.org"] = ["bob@example.org"]
        resolved = router(aliases=aliases).resolve(parse_address("l0@example.org"), False)
        self.assertEqual(finals(resolved), [("bob@example.org", True)])
