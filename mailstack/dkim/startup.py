# -*- test-case-name: tests.dkimsign.test_startup -*-
"""The server's DKIM signer, and a key for every local domain from the first start on.

``service.make_service`` builds one ``signer(config)`` for the ``dkimsign``
check and the DSNs the queue writes.  ``KeysService`` (a child of the server's
service, started after the thread pool) runs ``ensure_keys`` at start: a local
domain without an active key gets an RSA key (generated in the thread pool,
private key mode 0600 under ``data_dir/dkim``) and its DNS TXT record is
logged, ready to publish.  Later changes (``mailstack dkim
keygen``/``retire``) reach the running server through the key index, which
the store re-reads when it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack.dkim.keys import KeyList, KeyStore
from mailstack.dkim.signer import DKIMSigner

log = Logger()


def signer(config: Any) -> DKIMSigner:
    """The key store under ``data_dir/dkim`` and the local domains of ``config``."""
    return DKIMSigner(KeyStore(config.data_dir), config.is_local_domain)


def ensure_keys(run_blocking: Callable[..., Deferred], keys: KeyStore, domains: Iterable[str]) -> Deferred:
    """Make the missing keys in a thread; log each new one's record.  Never errbacks:
    a failure is logged and mail goes out unsigned until a key exists."""

    def made(new: KeyList) -> None:
        for info in new:
            log.info(
                'dkim: new {algorithm} key for {domain}; publish this TXT record: {name}. IN TXT "{record}"',
                algorithm=info.algorithm,
                domain=info.domain,
                name=info.name,
                record=info.record,
            )

    def failed(failure: Failure) -> None:
        log.failure("dkim: cannot create the missing signing keys; mail goes out unsigned", failure)

    return run_blocking(keys.ensure_keys, list(domains)).addCallbacks(made, failed)


class KeysService(Service):
    """Makes the missing keys of ``domains`` when the server starts."""

    def __init__(self, run_blocking: Callable[..., Deferred], keys: KeyStore, domains: Iterable[str]) -> None:
        self.run_blocking = run_blocking
        self.keys = keys
        self.domains = tuple(domains)
        self.done: Deferred | None = None  # fires once the keys exist (or creating them failed)

    def startService(self) -> None:
        super().startService()
        self.done = ensure_keys(self.run_blocking, self.keys, self.domains)
