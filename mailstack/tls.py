# -*- test-case-name: tests.test_tls -*-
"""The server certificate: loaded from ``[tls]`` or generated once, served with TLS 1.2+;
and the relay's client TLS policy (``ClientTLS``).

With ``tls.certificate`` set, that PEM file is the certificate, optionally
followed by its chain (leaf first, as ``fullchain.pem`` from ACME clients has
it); the key is ``tls.private_key`` or, if empty, found in the same file.
Without it, a self-signed certificate for ``hostname`` is generated with
``cryptography`` into ``data_dir/tls/`` on first start (``selfsigned.key`` mode
0600, then ``selfsigned.pem``) and reused afterwards.

``context_factory()`` returns a ``CertificateOptions`` with TLS 1.2 as the
minimum (RFC 8996 deprecates 1.0 and 1.1; RFC 8314 section 4.1 for submission).
TLS 1.2 is limited to the suites of Mozilla's "intermediate" server profile
without finite-field DHE: ECDHE key exchange (forward secrecy) with AES-GCM or
ChaCha20-Poly1305 (AEAD), the choice of RFC 9325 section 4.2; static-RSA key
exchange and CBC with SHA-1 are refused.  TLS 1.3 suites are OpenSSL's (all
AEAD with forward secrecy).  A sender on port 25 that offers nothing better
fails STARTTLS and, as RFC 7435 opportunistic senders do, retries in clear.
The same object is reused while the files are unchanged, because it caches the
OpenSSL context; when the files change (an ACME renewal), the next call loads
them again, so new connections get the new certificate without a restart.  A
renewal that fails to load is logged and the old certificate stays in use.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from typing import Any

from cryptography import x509

# Imported now, with the start's own rights: cryptography imports it lazily on
# the first ECDSA signature, and the self-signed certificate is made with the
# ``--uid`` account's effective ids (``privileges.as_account``), which need not
# be able to read the interpreter's packages.
from cryptography.hazmat.backends.openssl import backend as _openssl  # noqa: F401
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.interfaces import ITLSSettings
from mailstack.storage import fsutil

#: OpenSSL names of the TLS 1.2 suites we accept (see the module docstring).
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", re.S)

SELF_SIGNED_DAYS = 825  # the longest validity many clients still accept


class TLSError(Exception):
    """The certificate or key cannot be used; one line naming the file."""


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_options(cert_path: str, key_path: str) -> CertificateOptions:
    """Read PEM files into CertificateOptions; TLSError if they are unusable."""
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSError(f"{e.filename}: cannot read: {e.strerror}") from None
    certs = _PEM_CERT.findall(cert_pem)
    if not certs:
        raise TLSError(f"{cert_path}: no PEM certificate found")
    key = _PEM_KEY.search(key_pem)
    if not key:
        raise TLSError(f"{key_path}: no PEM private key found")
    try:
        chain = [x509.load_pem_x509_certificate(c) for c in certs]
        private_key = serialization.load_pem_private_key(key.group(0), password=None)
    except (ValueError, TypeError) as e:
        raise TLSError(f"{cert_path}: cannot load certificate or key: {e}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private_key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise TLSError(f"{key_path}: private key does not match the certificate in {cert_path}")
    return CertificateOptions(
        # pyOpenSSL takes cryptography objects directly (its own X509/PKey are
        # deprecated); Twisted's annotations still name the pyOpenSSL types.
        privateKey=private_key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
    )


def generate_self_signed(hostname: str, cert_path: str, key_path: str, now: datetime.datetime | None = None) -> None:
    """Write a fresh ECDSA P-256 key (0600) and a self-signed certificate for ``hostname``.

    P-256 rather than RSA: the server signs once per handshake, and an ECDSA
    P-256 signature costs a few hundredths of the CPU of an RSA-2048 one, which
    matters to clients that open one TLS connection per message.  Every TLS 1.3
    peer must accept it (RFC 8446 section 9.1), and TLS 1.2 peers offer the
    ECDHE-ECDSA suites of ``TLS12_CIPHERS`` (RFC 8422).

    The key is written first and the certificate last, each atomically, so a
    certificate file on disk always has its key next to it.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname == "localhost":
        alt_names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fsutil.write_atomic(key_path, key_pem, mode=0o600)
    fsutil.write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


@implementer(ITLSSettings, IOpenSSLContextFactory)
class TLSConfig:
    """The certificate in use; ``context_factory()`` for every TLS handshake."""

    log = Logger()

    def __init__(self, cert_path: str, key_path: str, generated: bool = False) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.generated = generated
        self._stamps = self._current_stamps()
        self._options = load_options(cert_path, key_path)

    @classmethod
    def from_config(cls, config: Any) -> TLSConfig:
        """Load ``[tls]`` or generate/reuse ``data_dir/tls/selfsigned.*``.  Blocking."""
        if config.tls.certificate:
            return cls(config.tls.certificate, config.tls.private_key or config.tls.certificate)
        folder = os.path.join(config.data_dir, "tls")
        cert_path = os.path.join(folder, "selfsigned.pem")
        key_path = os.path.join(folder, "selfsigned.key")
        try:
            fsutil.ensure_dir(folder)
            # Two processes starting at once must not write two different keys.
            with fsutil.locked(os.path.join(folder, "generate.lock")):
                if not (os.path.exists(cert_path) and os.path.exists(key_path)):
                    cls.log.info("generating a self-signed certificate for {hostname} in {folder}",
                                 hostname=config.hostname, folder=folder)
                    generate_self_signed(config.hostname, cert_path, key_path)
        except OSError as e:
            raise TLSError(f"{e.filename or folder}: cannot create the self-signed certificate: {e.strerror}") from None
        return cls(cert_path, key_path, generated=True)

    def _current_stamps(self) -> tuple:
        return (_stamp(self.cert_path), _stamp(self.key_path))

    def context_factory(self) -> CertificateOptions:
        """Server-side CertificateOptions (TLS 1.2+), reloaded if the files changed."""
        stamps = self._current_stamps()
        if stamps != self._stamps:
            self._stamps = stamps
            try:
                self._options = load_options(self.cert_path, self.key_path)
            except TLSError as e:
                self.log.error("keeping the previous certificate: {error}", error=str(e))
            else:
                self.log.info("loaded the changed certificate {path}", path=self.cert_path)
        return self._options

    def getContext(self) -> Any:
        """IOpenSSLContextFactory: the TLSMemoryBIOFactory of an ``ssl:`` listener
        is built once with this object and asks it for every connection, so a
        renewed certificate is used without rebuilding the listener."""
        return self.context_factory().getContext()


# -- outbound (the SMTP client's STARTTLS) -------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _Opportunistic:
    """Opportunistic TLS (RFC 7435): encrypt, send SNI, accept any certificate.

    ``optionsForClientTLS`` always verifies, hence this small connection creator.
    """

    def __init__(self, context: Any, server_name: str) -> None:
        self._context = context
        self._server_name = server_name

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        name = self._server_name
        if name and not re.fullmatch(r"[0-9.]+|.*:.*", name):  # RFC 6066 3: no IP literals in SNI
            try:
                connection.set_tlsext_host_name(name.encode("idna"))
            except Exception:
                pass
        connection.set_connect_state()
        return connection


class ClientTLS:
    """The relay's STARTTLS policy: a connection creator per server name.

    ``verify``: the certificate must chain to ``trust`` (``trust.trust_root``:
    the system store plus ``relay.tls_ca_file``) and match the name
    (``optionsForClientTLS``); the relay keeps one verifying instance for
    ``relay.tls_verify``, AUTH at the smarthost and MTA-STS ``enforce``.
    Otherwise opportunistic TLS (RFC 7435).  Building an OpenSSL context is
    costly, so one is kept per verified name (at most ``MAX_CACHED``) and one
    for all opportunistic connections; the owner (``RemoteAgent``) holds
    this object for the life of the process.
    """

    MAX_CACHED = 1000

    def __init__(self, verify: bool, trust: Any = None) -> None:
        self.verify = verify
        self.trust = trust  # an IOpenSSLTrustRoot (``trust.trust_root``); None: the system store
        self._verified: dict[str, IOpenSSLClientConnectionCreator] = {}
        self._opportunistic: Any = None

    def __call__(self, server_name: str) -> IOpenSSLClientConnectionCreator:
        from twisted.internet import ssl

        if self.verify:
            creator = self._verified.get(server_name)
            if creator is None:
                if len(self._verified) >= self.MAX_CACHED:
                    self._verified.clear()
                creator = self._verified[server_name] = ssl.optionsForClientTLS(server_name, trustRoot=self.trust)
            return creator
        if self._opportunistic is None:
            self._opportunistic = ssl.CertificateOptions(verify=False).getContext()
        return _Opportunistic(self._opportunistic, server_name)
