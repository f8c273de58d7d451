"""A local DNS server for the benchmark's inbound checks, and the load sender's DKIM key.

The inbound checks (SPF, DKIM verification, DMARC) ask the DNS about the
sender's domain; a benchmark must never ask the real one.  ``AuthDNS`` makes
an RSA-2048 DKIM key for ``CLIENT_DOMAIN`` (the load client's sender domain),
serves from a ``tests/support/dnsserver.DNSServer`` subprocess on loopback::

    client.test                    TXT "v=spf1 ip4:127.0.0.0/8 -all"
    _dmarc.client.test             TXT "v=DMARC1; p=none"
    bench._domainkey.client.test   TXT "v=DKIM1; k=rsa; p=..."

and signs load messages with that key (``sign``, for ``loadclient.run_load``'s
``transform``: done before the clock starts), so that every check has real
work to do and each one passes: SPF, DKIM and DMARC all ``pass``.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailstack.dkim.keys import KeyStore  # noqa: E402 (after the sys.path set-up above)
from mailstack.dkim.signer import DKIMSigner  # noqa: E402
from tests.support.dnsserver import DNSServer  # noqa: E402

CLIENT_DOMAIN = "client.test"  # loadclient.run_load's default sender is loadclient@client.test
SELECTOR = "bench"


def _strings(text: str, size: int = 255) -> list[str]:
    """A TXT value as character-strings of at most 255 octets (RFC 1035 section 3.3)."""
    return [text[i : i + size] for i in range(0, len(text), size)]


class AuthDNS:
    """The zone above, served on 127.0.0.1 once ``start`` returns."""

    def __init__(self, work: str) -> None:
        self.dir = os.path.join(work, "authdns")
        os.makedirs(self.dir, exist_ok=True)
        keys = KeyStore(self.dir)
        info = keys.keygen(CLIENT_DOMAIN, SELECTOR, "rsa")
        self.signer = DKIMSigner(keys, lambda domain: domain == CLIENT_DOMAIN)
        self.zone = {
            CLIENT_DOMAIN: [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
            f"_dmarc.{CLIENT_DOMAIN}": [("TXT", "v=DMARC1; p=none")],
            info.name: [("TXT", _strings(info.record))],
        }
        self.server = DNSServer(self.zone, self.dir)

    def start(self) -> str:
        """Start the server; returns its address for ``[dns] nameservers``."""
        self.server.start()
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.server.stop()

    def sign(self, message: bytes) -> bytes:
        """``message`` with a DKIM-Signature of ``CLIENT_DOMAIN`` on top."""
        return self.signer.sign_message(message, time.time())
