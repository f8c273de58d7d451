"""Tests for mailstack.tls: loading, generating and reloading the certificate."""

import datetime
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.ssl import CertificateOptions
from twisted.trial.unittest import SynchronousTestCase

from mailstack import config
from mailstack.tls import TLSConfig, TLSError, generate_self_signed


class TLSTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def cfg(self, **tls):
        return config.from_mapping({"data_dir": "data", "hostname": "mx.example.org", "tls": tls}, base=self.dir)

    def test_generateOnFirstStart(self):
        """Without [tls], a self-signed cert for hostname is written to data_dir/tls (key 0600)."""
        tls = TLSConfig.from_config(self.cfg())
        folder = os.path.join(self.dir, "data", "tls")
        self.assertTrue(tls.generated)
        self.assertEqual(tls.cert_path, os.path.join(folder, "selfsigned.pem"))
        self.assertEqual(stat.S_IMODE(os.stat(tls.key_path).st_mode), 0o600)
        with open(tls.cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)  # cheap handshakes
        self.assertEqual(cert.public_key().curve.name, "secp256r1")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["mx.example.org"])
        self.assertIsInstance(tls.context_factory(), CertificateOptions)

    def test_reuseGenerated(self):
        """A second start reuses the generated certificate instead of replacing it."""
        first = TLSConfig.from_config(self.cfg())
        with open(first.cert_path, "rb") as f:
            before = f.read()
        TLSConfig.from_config(self.cfg())
        with open(first.cert_path, "rb") as f:
            self.assertEqual(f.read(), before)

    def handshake(self, tls, version, ciphers=b"DEFAULT:@SECLEVEL=0"):
        """An in-memory handshake with a client capped at ``version`` offering ``ciphers`` (TLS 1.2)."""
        server = SSL.Connection(tls.context_factory().getContext(), None)
        server.set_accept_state()
        client_ctx = SSL.Context(SSL.TLS_METHOD)
        client_ctx.set_min_proto_version(0)
        client_ctx.set_max_proto_version(version)
        client_ctx.set_cipher_list(ciphers)
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        for _ in range(10):
            for a, b in ((client, server), (server, client)):
                try:
                    a.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    pass
        self.last_cipher = client.get_cipher_name()
        return client.get_protocol_version_name()

    def test_tls12Minimum(self):
        """A TLS 1.2 client gets through; a client capped at TLS 1.1 is refused."""
        tls = TLSConfig.from_config(self.cfg())
        self.assertEqual(self.handshake(tls, SSL.TLS1_2_VERSION), "TLSv1.2")
        self.assertRaises(SSL.Error, self.handshake, tls, SSL.TLS1_1_VERSION)

    def rsa_config(self):
        """A [tls] config naming an RSA-2048 certificate (users bring those too)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.org")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
        )
        with open(os.path.join(self.dir, "rsa.pem"), "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return self.cfg(certificate="rsa.pem")

    def test_tls12OnlyForwardSecretAEAD(self):
        """TLS 1.2 with static-RSA key exchange or CBC with SHA-1 is refused; ECDHE with
        AES-GCM or ChaCha20-Poly1305 gets through, for an RSA certificate and for the
        generated ECDSA one; TLS 1.3 is unaffected."""
        cases = {
            "RSA": (self.rsa_config(), b"RSA"),
            "ECDSA": (self.cfg(), b"ECDSA"),
        }
        for label, (cfg, auth) in cases.items():
            tls = TLSConfig.from_config(cfg)
            weak = [b"ECDHE-%s-AES128-SHA" % auth, b"ECDHE-%s-AES256-SHA384" % auth]
            if auth == b"RSA":
                weak += [b"AES128-SHA", b"AES256-GCM-SHA384"]  # static-RSA key exchange
            for suite in weak:
                self.assertRaises(SSL.Error, self.handshake, tls, SSL.TLS1_2_VERSION, suite + b":@SECLEVEL=0")
            for good in (b"ECDHE-%s-AES128-GCM-SHA256" % auth, b"ECDHE-%s-CHACHA20-POLY1305" % auth):
                self.assertEqual(self.handshake(tls, SSL.TLS1_2_VERSION, good), "TLSv1.2", label)
                self.assertEqual(self.last_cipher, good.decode())
            self.assertEqual(self.handshake(tls, SSL.TLS1_3_VERSION, b"AES128-SHA"), "TLSv1.3")

    def test_configuredChainInOneFile(self):
        """[tls] certificate may hold cert, chain and key in one file."""
        cert, key = os.path.join(self.dir, "c.pem"), os.path.join(self.dir, "k.pem")
        generate_self_signed("mx.example.org", cert, key)
        other_cert, other_key = os.path.join(self.dir, "c2.pem"), os.path.join(self.dir, "k2.pem")
        generate_self_signed("ca.example.org", other_cert, other_key)
        combined = os.path.join(self.dir, "full.pem")
        with open(combined, "wb") as out:
            for p in (cert, other_cert, key):
                with open(p, "rb") as f:
                    out.write(f.read())
        tls = TLSConfig.from_config(self.cfg(certificate="full.pem"))
        self.assertFalse(tls.generated)
        self.assertEqual(len(tls.context_factory().extraCertChain), 1)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "data", "tls")))

    def test_mismatchedKey(self):
        """A key that does not belong to the certificate is a one-line TLSError."""
        generate_self_signed("a.example", os.path.join(self.dir, "a.pem"), os.path.join(self.dir, "a.key"))
        generate_self_signed("b.example", os.path.join(self.dir, "b.pem"), os.path.join(self.dir, "b.key"))
        e = self.assertRaises(TLSError, TLSConfig.from_config, self.cfg(certificate="a.pem", private_key="b.key"))
        self.assertIn("b.key", str(e))

    def test_missingFile(self):
        """A configured certificate that does not exist is a TLSError naming it."""
        e = self.assertRaises(TLSError, TLSConfig.from_config, self.cfg(certificate="nope.pem"))
        self.assertIn("nope.pem", str(e))

    def test_reloadOnChange(self):
        """Replacing the files makes the next context_factory() load them; a bad
        replacement keeps the old certificate."""
        cert, key = os.path.join(self.dir, "c.pem"), os.path.join(self.dir, "k.pem")
        generate_self_signed("one.example", cert, key)
        tls = TLSConfig.from_config(self.cfg(certificate="c.pem", private_key="k.pem"))
        first = tls.context_factory()
        self.assertIs(tls.context_factory(), first)
        generate_self_signed("two.example", cert, key)
        second = tls.context_factory()
        self.assertIsNot(second, first)
        with open(cert, "wb") as f:
            f.write(b"garbage")
        self.assertIs(tls.context_factory(), second)
