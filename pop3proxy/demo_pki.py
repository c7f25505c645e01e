"""A throwaway certificate authority and server certificate for ``pop3proxy demo``.

The demo runs a real POP3S server in-process so that the proxy's verified TLS path is exercised
exactly as in production: chain checked against a CA file, host name checked against the
certificate. This module makes that PKI with :mod:`cryptography` (no test-only dependency):

- an EC P-256 CA: ``BasicConstraints(ca=True, path_length=0)`` (critical),
  ``KeyUsage(key_cert_sign, crl_sign)`` (critical) and a Subject Key Identifier;
- a leaf for DNS ``localhost`` and IP ``127.0.0.1``: ``BasicConstraints(ca=False)``,
  ``KeyUsage(digital_signature)``, ``ExtendedKeyUsage(serverAuth)``, SKI and AKI.

The extensions are not decoration: Python 3.13 turns on ``VERIFY_X509_STRICT`` in
``ssl.create_default_context``, which rejects certificates that lack AKI/SKI/KeyUsage.
Validity is a few days, never centuries. Everything lives in a directory the caller owns (a
``tempfile.TemporaryDirectory``), and the private key file is created with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEMO_SERVER_NAME", "DemoPKI"]

#: The host name the demo server certificate is issued for (and the proxy must verify).
DEMO_SERVER_NAME = "localhost"

#: How long the demo certificates are valid: long enough for any demo, short enough to be
#: obviously throwaway.
VALIDITY = datetime.timedelta(days=7)

#: Backdating covers small clock differences between the moment of issue and verification.
BACKDATE = datetime.timedelta(minutes=5)

_KEY_FILE_MODE = 0o600


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pop3proxy demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file that only the owner can read (mode 0600 from creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    # O_CREAT's mode is filtered by the umask and ignored for an existing file: enforce it.
    os.chmod(path, _KEY_FILE_MODE)


@dataclass(frozen=True, slots=True)
class DemoPKI:
    """PEM files of a freshly made demo CA and a server certificate signed by it.

    Attributes:
        ca_cert_path: the CA certificate; give it to the proxy as ``--upstream-ca-file``.
        server_cert_path: the server certificate (leaf only; the CA is the trust anchor).
        server_key_path: the server's private key, mode 0600.
    """

    ca_cert_path: Path
    server_cert_path: Path
    server_key_path: Path

    @classmethod
    def create(cls, directory: Path, *, now: datetime.datetime | None = None) -> DemoPKI:
        """Make a new CA and server certificate and write them as PEM files into ``directory``.

        Args:
            directory: an existing directory, normally a temporary one the caller removes.
            now: the issue time (defaults to the current time); tests use it to check validity.
        """
        now = now or datetime.datetime.now(datetime.UTC)
        not_before = now - BACKDATE
        not_after = now + VALIDITY

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("pop3proxy demo CA")
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(DEMO_SERVER_NAME))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(DEMO_SERVER_NAME),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )

        pki = cls(
            ca_cert_path=directory / "demo-ca.pem",
            server_cert_path=directory / "demo-server.pem",
            server_key_path=directory / "demo-server.key",
        )
        pki.ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        pki.server_cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        _write_private(
            pki.server_key_path,
            server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        # The CA key is never written anywhere: it dies with this function.
        return pki

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context presenting the demo certificate (TLS 1.2 minimum)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.keylog_filename = None  # type: ignore[assignment]  # ignore SSLKEYLOGFILE
        ctx.load_cert_chain(self.server_cert_path, self.server_key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts only the demo CA (for tests and examples)."""
        ctx = ssl.create_default_context(cafile=self.ca_cert_path)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.keylog_filename = None  # type: ignore[assignment]
        return ctx
