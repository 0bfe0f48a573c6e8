"""Certificates for TLS clusters in tests: a certificate authority and one leaf per call.

Every call of :func:`write_tls_files` makes a new, unrelated authority, so two calls
give a cluster's certificates and a stranger's. The leaf certificate names
``localhost``, ``127.0.0.1`` and ``dask-internal`` and serves every role (scheduler,
worker, client), the way ``distributed.Security.temporary`` does. Needs ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TLSFiles", "write_tls_files"]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one authority and the leaf certificate it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def security(self, **kwargs: Any) -> Any:
        """A :class:`distributed.Security` using these files for every role."""
        from distributed import Security

        files = {"ca_file": str(self.ca_file), "cert": str(self.cert_file),
                 "key": str(self.key_file)}
        return Security(
            require_encryption=True,
            tls_ca_file=files["ca_file"],
            tls_client_cert=files["cert"], tls_client_key=files["key"],
            tls_scheduler_cert=files["cert"], tls_scheduler_key=files["key"],
            tls_worker_cert=files["cert"], tls_worker_key=files["key"],
            **kwargs,
        )


def write_tls_files(directory: str | Path, name: str = "dask") -> TLSFiles:
    """Write ``NAME-ca.pem``, ``NAME-cert.pem`` and ``NAME-key.pem`` into ``directory``.

    >>> files = write_tls_files(tmp_path)  # doctest: +SKIP
    >>> LocalCluster(protocol="tls://", security=files.security())  # doctest: +SKIP
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    lifetime = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test authority")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(lifetime[0]).not_valid_after(lifetime[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(lifetime[0]).not_valid_after(lifetime[1])
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.DNSName("dask-internal"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                              x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = TLSFiles(directory / f"{name}-ca.pem", directory / f"{name}-cert.pem",
                     directory / f"{name}-key.pem")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    files.key_file.chmod(0o600)
    return files
