"""TLS for dask clusters: :class:`distributed.Security` from files, config or memory.

Dask authenticates both ends of a TLS connection: the client checks the scheduler's
certificate against the cluster's certificate authority (CA), and the scheduler refuses
a client whose certificate that CA did not sign. A client therefore needs three files:
the CA certificate, its own certificate and its private key (the key may be appended to
the certificate file). Without flags they come from dask's own configuration,
``distributed.comm.tls.ca-file`` and ``distributed.comm.tls.client.{cert,key}``
(``DASK_DISTRIBUTED__COMM__TLS__CA_FILE=...``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence

import dask.config
from distributed import Security

from engine.errors import MissingExtraError, SpecError

__all__ = ["tls_security", "configured_security", "temporary_security", "has_client_tls"]

_CONFIG_NAMES = ("distributed.comm.tls.ca-file", "distributed.comm.tls.client.cert",
                 "distributed.comm.tls.client.key")


def _check_pem(path: str, name: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except FileNotFoundError:
        raise SpecError(f"{name} {path}: file not found; give the {what} (PEM file)") from None
    except OSError as err:
        raise SpecError(
            f"{name} {path}: cannot read it ({err.strerror or err}); give a readable {what}"
        ) from None
    if b"-----BEGIN" not in head:
        raise SpecError(f"{name} {path}: not a PEM file; give the {what} in PEM format")


def tls_security(
    ca_file: str,
    cert_file: str,
    key_file: str | None = None,
    *,
    names: Sequence[str] = ("--tls-ca", "--tls-cert", "--tls-key"),
) -> Security:
    """A :class:`distributed.Security` that uses one certificate for every role.

    The files are checked now (they exist, are PEM, the key matches the certificate)
    so that a typo is one :class:`SpecError` naming the flag, not a traceback from
    the first connection. ``names`` are the names used in those messages.

    >>> sec = tls_security("ca.pem", "client.pem", "client-key.pem")  # doctest: +SKIP
    >>> connect("tls://10.0.0.5:8786", security=sec)  # doctest: +SKIP
    """
    ca_file, cert_file = os.path.expanduser(ca_file), os.path.expanduser(cert_file)
    key_file = os.path.expanduser(key_file) if key_file is not None else None
    _check_pem(ca_file, names[0], "certificate of the cluster's authority (CA)")
    _check_pem(cert_file, names[1], "certificate of this client")
    if key_file is not None:
        _check_pem(key_file, names[2], "private key of the client certificate")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as err:
        raise SpecError(f"{names[0]} {ca_file}: not a usable CA certificate ({err.reason or err})"
                        ) from None
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as err:
        which = f"{names[1]} {cert_file} and {names[2]} {key_file}" if key_file else \
            f"{names[1]} {cert_file}"
        hint = ("the key does not belong to the certificate" if "MISMATCH" in str(err)
                else f"give the key with {names[2]}" if key_file is None
                else str(err.reason or err))
        raise SpecError(f"{which}: cannot load the certificate and key: {hint}") from None
    return Security(
        require_encryption=True,
        tls_ca_file=ca_file,
        tls_client_cert=cert_file, tls_client_key=key_file,
        tls_scheduler_cert=cert_file, tls_scheduler_key=key_file,
        tls_worker_cert=cert_file, tls_worker_key=key_file,
    )


def configured_security() -> Security | None:
    """The TLS settings of dask's configuration, checked; ``None`` when none are set.

    Reads ``distributed.comm.tls.ca-file`` and ``distributed.comm.tls.client.{cert,key}``
    (and ``distributed.comm.require-encryption`` through :class:`distributed.Security`).
    """
    ca, cert, key = (dask.config.get(name, None) for name in _CONFIG_NAMES)
    if not (ca or cert or key):
        security = Security()
        return security if security.require_encryption else None
    if not (ca and cert):
        missing = _CONFIG_NAMES[0] if not ca else _CONFIG_NAMES[1]
        raise SpecError(f"dask config sets part of the TLS files but not {missing}: set "
                        f"{', '.join(_CONFIG_NAMES[:2])} (and the key), or none of them")
    if "\n" in ca or "\n" in cert:  # PEM text in the config, which dask accepts too
        return Security()
    ca, cert = os.path.expanduser(ca), os.path.expanduser(cert)
    key = os.path.expanduser(key) if key and "\n" not in key else key
    _check_pem(ca, _CONFIG_NAMES[0], "certificate of the cluster's authority (CA)")
    _check_pem(cert, _CONFIG_NAMES[1], "certificate of this client")
    if key and "\n" not in key:
        _check_pem(key, _CONFIG_NAMES[2], "private key of the client certificate")
    # dask reads every other role and setting from its config; ~ it does not expand
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key)


def has_client_tls(security: Security | None) -> bool:
    """Whether ``security`` holds what a client needs to open a TLS connection."""
    return bool(getattr(security, "tls_ca_file", None)
                and getattr(security, "tls_client_cert", None))


def temporary_security() -> Security:
    """Self-signed certificates that exist only in memory, for a local TLS cluster."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            "a local TLS cluster makes temporary certificates with cryptography: install it "
            "with pip install cryptography, or give certificate files with --tls-ca, "
            "--tls-cert and --tls-key"
        ) from None
    return Security.temporary()
