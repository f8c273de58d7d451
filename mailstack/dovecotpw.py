# -*- test-case-name: tests.test_dovecotpw -*-
"""A Dovecot passwd-file kept in step with the users, for IMAP via Dovecot.

IMAP is served by Dovecot on mailstack's own Maildirs (``etc/dovecot-imap.conf``).
Dovecot checks passwords against a passwd-file (``passdb { driver =
passwd-file }``) holding the very Argon2id hashes mailstack stores: Dovecot
2.3 verifies ``{ARGON2ID}`` followed by the PHC string argon2-cffi writes
(``$argon2id$v=19$m=19456,t=2,p=1$salt$hash``) through libsodium, so a
password changed with ``mailstack user passwd`` works for IMAP at once and no
plaintext or second hash is kept (tested with ``doveadm pw -t``).

Each line is ``user:{ARGON2ID}$argon2id$...:::::`` (passwd(5) fields: the
uid, gid, gecos, home and shell are empty; the Dovecot config gives the uid,
gid and home of every user with a static userdb).  User keys never contain
``:`` or control characters (``address.mailbox_components``); a key that did
would be left out rather than corrupt the file.  Dovecot notices a new file by
its mtime and size, so each rewrite gets an mtime in a later second than the
file it replaces.

``sync(users, path)`` rewrites the whole file from ``users.json`` after every
``user add|passwd|del``: temporary file with the final mode (not subject to
the umask: Dovecot's auth process must be able to read it), fsync, rename,
fsync of the folder.  It holds the users lock while it reads and writes, so
two admin commands at once leave the file matching the last change, and a
failed or missed sync is repaired by the next one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mailstack.auth.userdb import UserDB
from mailstack.storage import fsutil

# PHC algorithm identifier -> Dovecot scheme name (Dovecot 2.3, libsodium).
SCHEMES = {"argon2id": "ARGON2ID", "argon2i": "ARGON2I"}

MODE = 0o640  # owner writes, Dovecot's group reads


def passwd_line(key: str, phc: str) -> str | None:
    """The passwd-file line for one user, or None if it cannot be expressed."""
    scheme = SCHEMES.get(phc.split("$")[1] if phc.startswith("$") and phc.count("$") >= 2 else "")
    if scheme is None:
        return None
    if any(c == ":" or not c.isprintable() for c in key + phc):
        return None
    return f"{key}:{{{scheme}}}{phc}:::::"


def render(hashes: Mapping[str, str]) -> bytes:
    """The whole file, users sorted."""
    lines = (passwd_line(key, phc) for key, phc in sorted(hashes.items()))
    return "".join(line + "\n" for line in lines if line is not None).encode("utf-8")


def write_passwd_file(path: str, hashes: Mapping[str, str], mode: int = MODE) -> None:
    """Replace ``path`` with the file for ``hashes`` (``{key: PHC string}``) durably."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp.{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}")
    fsutil.write_new(tmp, render(hashes), mode)
    try:
        os.chmod(tmp, mode)  # write_new's mode went through the umask
        _newer_than(path, tmp)
        os.rename(tmp, path)
    except BaseException:
        fsutil.unlink_durable(tmp, sync_dir=False)
        raise
    fsutil.fsync_dir(folder)


def _newer_than(old: str, new: str) -> None:
    """Give ``new`` an mtime in a later second than ``old``'s.

    Dovecot re-reads a passwd-file when its mtime (in whole seconds) or its
    size changed; a password change within the same second keeps the size
    (same hash parameters), so without this Dovecot would go on accepting the
    old password until the next change.
    """
    try:
        before = int(os.stat(old).st_mtime)
    except FileNotFoundError:
        return
    if int(os.stat(new).st_mtime) <= before:
        os.utime(new, (before + 1, before + 1))


def sync(users: UserDB, path: str, mode: int = MODE) -> int:
    """Rewrite ``path`` from the user file; returns the number of users written.

    Blocking (file I/O): the admin command calls it directly after each change.
    """
    with users.hashes_locked() as hashes:
        write_passwd_file(path, hashes, mode)
        return sum(1 for k, h in hashes.items() if passwd_line(k, h) is not None)
