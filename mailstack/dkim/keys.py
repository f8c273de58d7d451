# -*- test-case-name: tests.dkimsign.test_keys -*-
"""The DKIM key store under ``data_dir/dkim/``.

Files::

    dkim/keys.json                              the index (mode 0600)
    dkim/keys.lock                              held while the index changes
    dkim/<selector>._domainkey.<domain>.pem     a private key, PKCS#8 PEM, mode 0600

The index (``auth/jsonfile.py``: re-read by a running server when it changes,
rewritten atomically under the lock) maps ``<selector>._domainkey.<domain>``
to ``{"domain", "selector", "algorithm", "state", "created", "public"}``;
``state`` is "active" (signs) or "retired" (kept, no longer signs), ``public``
is the ``p=`` value of the DNS record.  The admin command's ``dkim keygen`` and
``dkim retire`` therefore take effect without a restart.

Keys: RSA 2048 bits (RFC 8301 section 3.2 requires at least 1024 and
recommends 2048) or Ed25519 (RFC 8463).  A private key is written (fsynced,
renamed into place) before the index names it, so the index never points to a
missing file.  Selectors default to ``<year>a``, ``<year>b``, ...: a new one
for each key, so a rotation publishes the new record beside the old one.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from mailstack.address import AddressError, normalize_domain
from mailstack.auth.jsonfile import FileFormatError, JSONFile
from mailstack.dkim.sign import PrivateKey, SigningKey
from mailstack.storage import fsutil

FORMAT_VERSION = 1
RSA_BITS = 2048
ALGORITHMS = ("rsa", "ed25519")
ACTIVE, RETIRED = "active", "retired"

# A selector is one or more DNS labels (RFC 6376 section 3.1).
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


class KeyStoreError(Exception):
    """A refused key operation (one line): bad selector, key exists, unknown key."""


@dataclass(frozen=True)
class KeyInfo:
    """One key as the index records it, without the private key."""

    domain: str
    selector: str
    algorithm: str
    state: str
    created: int
    public: str

    @property
    def name(self) -> str:
        """Where the TXT record goes (without the final dot)."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def record(self) -> str:
        """The TXT record text (RFC 6376 section 3.6.1; RFC 8463 section 4.2)."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "selector": self.selector,
            "algorithm": self.algorithm,
            "state": self.state,
            "created": self.created,
            "name": self.name,
            "record": self.record,
        }


KeyList = list[KeyInfo]
SigningKeys = list[SigningKey]


def _new_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ed25519.Ed25519PrivateKey.generate()


def public_value(key: PrivateKey) -> str:
    """The record's ``p=``: base64 of the SubjectPublicKeyInfo DER for RSA
    (RFC 6376 section 3.6.1), of the raw 32-byte public key for Ed25519
    (RFC 8463 section 4.2)."""
    if isinstance(key, RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        der = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(der).decode("ascii")


def _selectors(year: int) -> Iterable[str]:
    """``2026a`` ... ``2026z``, ``2026aa``, ``2026ab``, ..."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for size in itertools.count(1):
        for combo in itertools.product(letters, repeat=size):
            yield f"{year}{''.join(combo)}"


class KeyStore:
    """``data_dir/dkim``: the admin command writes it, the server reads it."""

    def __init__(self, data_dir: str) -> None:
        self.folder = os.path.join(data_dir, "dkim")
        self._file = JSONFile(
            os.path.join(self.folder, "keys.json"), os.path.join(self.folder, "keys.lock"), "keys", FORMAT_VERSION
        )
        # Loaded keys by file name, with the file's stamp: read again only
        # when a key file is replaced.
        self._loaded: dict[str, tuple[tuple[int, int, int], SigningKey]] = {}

    # -- reading ------------------------------------------------------------------

    def list(self, include_retired: bool = False) -> KeyList:
        """Keys by domain, then creation, then selector; active ones only unless asked."""
        infos = []
        for name, entry in self._file.current().items():
            try:
                infos.append(KeyInfo(**entry))
            except TypeError:
                raise FileFormatError(f"{self._file.path}: entry {name!r} is not a key record") from None
        if not include_retired:
            infos = [i for i in infos if i.state == ACTIVE]
        return sorted(infos, key=lambda i: (i.domain, i.created, i.selector))

    def active(self, domain: str) -> SigningKeys:
        """The keys that sign mail from ``domain`` (A-label), private keys loaded.

        One ``stat`` of the index per call; key files are read only when the
        index or the file changed.  Blocking (small file reads): call it in the
        thread pool with the body hashing, or accept one stat on the reactor.
        """
        return [self._signing_key(i) for i in self.list() if i.domain == domain]

    def loaded(self, domain: str) -> SigningKeys | None:
        """As ``active``, when every key file is loaded already (stats only, and
        a re-read of the index after an admin change, as for the users file);
        None when a key file must be read: call ``active`` in the thread pool."""
        keys = []
        for info in self.list():
            if info.domain == domain:
                key = self._cached_key(info)
                if key is None:
                    return None
                keys.append(key)
        return keys

    def _path(self, domain: str, selector: str) -> str:
        return os.path.join(self.folder, f"{selector}._domainkey.{domain}.pem")

    def _signing_key(self, info: KeyInfo) -> SigningKey:
        return self._cached_key(info) or self._load_key(info)

    def _cached_key(self, info: KeyInfo) -> SigningKey | None:
        """The key of ``info`` as loaded before, if its file is unchanged since."""
        path = self._path(info.domain, info.selector)
        cached = self._loaded.get(path)
        if cached is None or cached[0] != _stamp(path) or cached[1].algorithm != info.algorithm:
            return None
        return cached[1]

    def _load_key(self, info: KeyInfo) -> SigningKey:
        path = self._path(info.domain, info.selector)
        stamp = _stamp(path)
        with open(path, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), password=None)
        expected = RSAPrivateKey if info.algorithm == "rsa" else Ed25519PrivateKey
        if not isinstance(private, expected):
            raise KeyStoreError(f"{path}: not an {info.algorithm} private key")
        key = SigningKey(info.domain, info.selector, info.algorithm, private)
        self._loaded[path] = (stamp, key)
        return key

    # -- writing ------------------------------------------------------------------

    def keygen(
        self, domain: str, selector: str | None = None, algorithm: str = "rsa", now: float | None = None
    ) -> KeyInfo:
        """A new active key for ``domain``; KeyStoreError for a bad or taken selector."""
        info = self._add(domain, selector, algorithm, now, only_if_missing=False)
        assert info is not None  # only_if_missing=False always adds or raises
        return info

    def ensure_keys(self, domains: Iterable[str], now: float | None = None) -> KeyList:
        """An RSA key for each domain that has no active key; returns the new ones.

        Run it in the thread pool at start (RSA key generation takes tens of
        milliseconds) and log each returned key's ``name`` and ``record``.
        """
        made = []
        for domain in domains:
            if not self.active_infos(domain):
                info = self._add(domain, None, "rsa", now, only_if_missing=True)
                if info is not None:
                    made.append(info)
        return made

    def active_infos(self, domain: str) -> KeyList:
        return [i for i in self.list() if i.domain == domain]

    def retire(self, domain: str, selector: str) -> KeyInfo:
        """Stop signing with a key (it stays listed as retired, its file kept).

        Refused for an unknown or retired key, and for the last active key of a
        domain: mail would go out unsigned.  Make and publish a new key first.
        """
        domain = _domain(domain)
        name = f"{selector}._domainkey.{domain}"
        result: list[KeyInfo] = []

        def change(keys: dict[str, Any]) -> None:
            entry = keys.get(name)
            if entry is None or entry["state"] != ACTIVE:
                raise KeyStoreError(f"{name}: no such active key")
            others = [k for k, e in keys.items() if e["domain"] == domain and e["state"] == ACTIVE and k != name]
            if not others:
                raise KeyStoreError(f"{name}: the last active key of {domain}; make and publish a new one first")
            keys[name] = dict(entry, state=RETIRED)
            result.append(KeyInfo(**keys[name]))

        self._file.update(change)
        return result[0]

    def _add(
        self, domain: str, selector: str | None, algorithm: str, now: float | None, only_if_missing: bool
    ) -> KeyInfo | None:
        domain = _domain(domain)
        if algorithm not in ALGORITHMS:
            raise KeyStoreError(f"{algorithm}: unknown algorithm (one of {', '.join(ALGORITHMS)})")
        if selector is not None:
            selector = selector.lower()
            if not _SELECTOR.match(selector):
                raise KeyStoreError(f"{selector}: not a valid selector (DNS labels of letters, digits and -)")
        created = int(time.time() if now is None else now)
        private = _new_private_key(algorithm)  # slow for RSA: outside the lock
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        result: list[KeyInfo] = []

        def change(keys: dict[str, Any]) -> None:
            taken = {e["selector"] for e in keys.values() if e["domain"] == domain}
            if only_if_missing and any(e["domain"] == domain and e["state"] == ACTIVE for e in keys.values()):
                return  # another process made one meanwhile
            chosen = selector
            if chosen is None:
                year = time.gmtime(created).tm_year
                chosen = next(s for s in _selectors(year) if s not in taken)
            elif chosen in taken:
                raise KeyStoreError(f"{chosen}._domainkey.{domain}: selector exists")
            # The key file is durable before the index names it.
            fsutil.write_atomic(self._path(domain, chosen), pem, mode=0o600)
            info = KeyInfo(domain, chosen, algorithm, ACTIVE, created, public_value(private))
            keys[info.name] = {
                "domain": info.domain,
                "selector": info.selector,
                "algorithm": info.algorithm,
                "state": info.state,
                "created": info.created,
                "public": info.public,
            }
            result.append(info)

        self._file.update(change)
        return result[0] if result else None


def _stamp(path: str) -> tuple[int, int, int]:
    """What changes when a key file is replaced: (mtime, size, inode)."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _domain(text: str) -> str:
    try:
        domain = normalize_domain(text)
    except AddressError as e:
        raise KeyStoreError(str(e)) from None
    if domain[:1] == "[" or domain.replace(".", "").isdigit():
        raise KeyStoreError(f"{text}: a domain name is needed, not an address literal")
    return domain
