# -*- test-case-name: tests.auth.test_aliases -*-
"""Aliases: one address expands to one or more targets, local or remote.

File ``data_dir/aliases.json`` (UTF-8 JSON, mode 0600), changed only through the
admin command and re-read by a running server when it changes::

    {
      "version": 1,
      "aliases": {
        "sales@example.org": ["alice@example.org", "bob@partner.example"]
      }
    }

Keys and targets are ``Address.key`` strings.  Only direct targets are stored;
``routing.Router`` expands them recursively and detects loops.  Mutations take
``data_dir/aliases.lock`` and rewrite the file atomically (``jsonfile.JSONFile``).
"""

from __future__ import annotations

import os

from zope.interface import implementer

from mailstack.address import parse_address
from mailstack.auth.jsonfile import FileFormatError, JSONFile
from mailstack.interfaces import IAliasDB

FORMAT_VERSION = 1

__all__ = ["AliasDB", "NoSuchAlias", "FileFormatError"]


class NoSuchAlias(Exception):
    """``delete`` of a key that is no alias."""


@implementer(IAliasDB)
class AliasDB:
    """``data_dir/aliases.json``; lock ``aliases.lock`` in the same folder."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = JSONFile(path, os.path.join(os.path.dirname(path), "aliases.lock"), "aliases", FORMAT_VERSION)

    def targets(self, key: str) -> list[str] | None:
        found = self._file.current().get(key)
        return list(found) if found is not None else None

    def items(self) -> list[tuple[str, list[str]]]:
        """All ``(alias, targets)``, sorted by alias."""
        return sorted((k, list(v)) for k, v in self._file.current().items())

    def add(self, key: str, targets: list[str]) -> None:
        """Add ``targets`` to alias ``key`` (created if new); duplicates are dropped.

        Adding to an existing alias extends it, so ``alias add sales@x carol@x``
        is how a target is added; ``alias del`` and ``add`` again replace it.
        """
        for address in [key, *targets]:
            if parse_address(address).key != address:
                raise ValueError(f"{address!r} is not normalised")
        if not targets:
            raise ValueError("an alias needs at least one target")

        def change(aliases: dict) -> None:
            aliases[key] = list(dict.fromkeys([*aliases.get(key, []), *targets]))

        self._file.update(change)

    def delete(self, key: str) -> None:
        """Remove alias ``key``; NoSuchAlias if it is none."""

        def change(aliases: dict) -> None:
            if aliases.pop(key, None) is None:
                raise NoSuchAlias(key)

        self._file.update(change)
