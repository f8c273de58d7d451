# -*- test-case-name: tests.test_mtasts -*-
"""Which certificate authorities outbound TLS trusts: the system store plus ``relay.tls_ca_file``.

Verified outbound connections (MTA-STS policy fetches, and the relay when it
must verify a peer) use ``trust_root(ca_file)`` with Twisted's
``optionsForClientTLS`` or ``BrowserLikePolicyForHTTPS``.  The extra file holds
PEM certificates of private CAs (a company CA, or a test CA); it adds to the
system store, it does not replace it.
"""

from __future__ import annotations

from typing import Any

# Twisted's only seam for "extra CAs on top of the system store" is this
# interface, which it does not export publicly; it is imported here alone and
# re-exported for the modules that take a trust root.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from zope.interface import implementer

__all__ = ["IOpenSSLTrustRoot", "SystemAndFileTrust", "TrustError", "trust_root"]


class TrustError(Exception):
    """The CA file cannot be used (one line naming it)."""


@implementer(IOpenSSLTrustRoot)
class SystemAndFileTrust:
    """The platform's default verify paths plus the PEM certificates in ``ca_file``."""

    def __init__(self, ca_file: str = "") -> None:
        self.ca_file = ca_file
        if ca_file:
            try:
                with open(ca_file, "rb") as f:
                    if b"-----BEGIN CERTIFICATE-----" not in f.read():
                        raise TrustError(f"{ca_file}: no PEM certificate found")
            except OSError as e:
                raise TrustError(f"{ca_file}: cannot read: {e.strerror}") from None

    def _addCACertsToContext(self, context: Any) -> None:
        """IOpenSSLTrustRoot: called with each new client context."""
        context.set_default_verify_paths()
        if self.ca_file:
            context.load_verify_locations(self.ca_file)


def trust_root(ca_file: str = "") -> IOpenSSLTrustRoot:
    """The trust root for verified outbound TLS; TrustError if ``ca_file`` is unusable."""
    return SystemAndFileTrust(ca_file)
