# -*- test-case-name: tests.auth.test_userdb -*-
"""The user database: who may log in, with which password.

File ``data_dir/users.json`` (UTF-8 JSON, mode 0600), changed only through the
admin command and re-read by a running server when it changes::

    {
      "version": 1,
      "users": {
        "alice@example.org": {"password": "$argon2id$v=19$m=19456,t=2,p=1$...", "created": 1767225600}
      }
    }

Keys are ``Address.key`` (lowercased local part, IDNA A-label domain) and are
always safe mailbox names (``address.mailbox_components``), because each user
gets a Maildir under ``data_dir/mail/<domain>/<localpart>``.  ``password`` is an
Argon2id PHC string (argon2-cffi); plaintext passwords are never stored.  The
parameters follow OWASP's password storage cheat sheet (m=19 MiB, t=2, p=1): about
50 ms per check here, so 32 pool threads stay within a few hundred MiB.

Mutations take ``data_dir/users.lock`` and rewrite the file atomically
(``jsonfile.JSONFile``), so parallel admin commands lose nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from zope.interface import implementer

from mailstack.address import mailbox_components, parse_address
from mailstack.auth.jsonfile import FileFormatError, JSONFile
from mailstack.interfaces import IUserDB

FORMAT_VERSION = 1

__all__ = ["UserDB", "UserExists", "NoSuchUser", "FileFormatError"]


class UserExists(Exception):
    """``add`` of a key that is already a user."""


class NoSuchUser(Exception):
    """``set_password``/``delete`` of a key that is no user."""


def _hasher() -> argon2.PasswordHasher:
    # OWASP Password Storage Cheat Sheet, Argon2id: m=19456 KiB, t=2, p=1.
    return argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


def _as_bytes(password: str | bytes) -> bytes:
    return password if isinstance(password, bytes) else password.encode("utf-8")


def check_key(key: str) -> str:
    """``key`` if it is a normalised, path-safe user key; AddressError otherwise."""
    address = parse_address(key)
    mailbox_components(address)
    if address.key != key:
        raise ValueError(f"{key!r} is not normalised (expected {address.key!r})")
    return key


@implementer(IUserDB)
class UserDB:
    """``data_dir/users.json``; lock ``users.lock`` in the same folder."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = JSONFile(path, os.path.join(os.path.dirname(path), "users.lock"), "users", FORMAT_VERSION)
        self._hasher = _hasher()
        # Verified against when the user does not exist, so that a check for an
        # unknown user costs as much as one for a known user (no user enumeration
        # by timing).
        self._dummy = self._hasher.hash(os.urandom(16))

    # -- reading (server) ------------------------------------------------------

    def exists(self, key: str) -> bool:
        return key in self._file.current()

    def keys(self) -> list[str]:
        return sorted(self._file.current())

    def info(self, key: str) -> dict:
        """The stored record without the hash (``created``); NoSuchUser if absent."""
        record = self._file.current().get(key)
        if record is None:
            raise NoSuchUser(key)
        return {k: v for k, v in record.items() if k != "password"}

    def stored_hash(self, key: str) -> str | None:
        """The PHC string of ``key`` (a fresh salt per change), None if no user."""
        record = self._file.current().get(key)
        stored = record.get("password") if isinstance(record, dict) else None
        return stored if isinstance(stored, str) else None

    def check_password(self, key: str, password: str | bytes) -> bool:
        """Argon2 verification (constant time in the password); blocking, ~50 ms."""
        stored = self.stored_hash(key)
        try:
            return self._hasher.verify(stored or self._dummy, _as_bytes(password)) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    @contextmanager
    def hashes_locked(self) -> Iterator[dict[str, str]]:
        """``{key: PHC string}`` as on disk, the users lock held for the block, so
        that a copy made from it (``dovecotpw``) follows the changes in order."""
        with self._file.locked_view() as users:
            yield {k: r["password"] for k, r in users.items() if isinstance(r, dict) and r.get("password")}

    # -- writing (admin command) -----------------------------------------------

    def hash(self, password: str | bytes) -> str:
        """The PHC string to store for ``password`` (slow; done outside the lock)."""
        return self._hasher.hash(_as_bytes(password))

    def add(self, key: str, password: str | bytes) -> None:
        """Create user ``key``; UserExists if it is one already."""
        check_key(key)
        record = {"password": self.hash(password), "created": int(time.time())}

        def change(users: dict) -> None:
            if key in users:
                raise UserExists(key)
            users[key] = record

        self._file.update(change)

    def set_password(self, key: str, password: str | bytes) -> None:
        """Replace the password of ``key``; NoSuchUser if it is no user."""
        hashed = self.hash(password)

        def change(users: dict) -> None:
            if key not in users:
                raise NoSuchUser(key)
            users[key] = dict(users[key], password=hashed)

        self._file.update(change)

    def delete(self, key: str) -> None:
        """Remove ``key`` (its Maildir stays on disk); NoSuchUser if absent."""

        def change(users: dict) -> None:
            if users.pop(key, None) is None:
                raise NoSuchUser(key)

        self._file.update(change)
