"""A throwaway certificate authority for end-to-end TLS tests (``cryptography``).

``TestCA(folder)`` writes ``ca.pem``; ``issue(name)`` writes a key and a
certificate for ``name`` (subject CN and DNS subjectAltName) signed by it and
returns an ``ssl.SSLContext`` for a server presenting it.  ``self_signed(name)``
gives a server context with a certificate nobody vouches for.
"""

from __future__ import annotations

import datetime
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_PEM = serialization.Encoding.PEM


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    with open(path, "wb") as f:
        f.write(key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, names: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in (subject, *names)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


class TestCA:
    """A CA whose certificate is ``ca_file``."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.key = _key()
        self.cert = _cert("mailstack test CA", self.key, "mailstack test CA", self.key, ca=True)
        self.ca_file = os.path.join(folder, "ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(self.cert.public_bytes(_PEM))

    def issue(self, name: str, *more: str) -> tuple[str, str]:
        """(certificate file, key file) for ``name`` (and the names ``more``), signed by this CA."""
        key = _key()
        cert = _cert(name, key, "mailstack test CA", self.key, ca=False, names=more)
        cert_file = os.path.join(self.folder, f"{name}.pem")
        key_file = os.path.join(self.folder, f"{name}.key")
        with open(cert_file, "wb") as f:
            f.write(cert.public_bytes(_PEM))
        _write_key(key_file, key)
        return cert_file, key_file

    def server_context(self, name: str, *more: str) -> ssl.SSLContext:
        cert_file, key_file = self.issue(name, *more)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        return ctx


def self_signed_context(folder: str, name: str) -> ssl.SSLContext:
    """A server context with a self-signed certificate for ``name`` (verifies for nobody)."""
    key = _key()
    cert = _cert(name, key, name, key, ca=False)
    cert_file, key_file = os.path.join(folder, f"self-{name}.pem"), os.path.join(folder, f"self-{name}.key")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(_PEM))
    _write_key(key_file, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
