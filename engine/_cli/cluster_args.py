"""The cluster flags of the command line, and their translation into ``connect`` arguments.

Values are taken as text and checked by :func:`connect_kwargs`, so that a bad one is a
single :class:`~engine.errors.SpecError` line naming the flag (exit code 2), like every
other bad input, and not argparse's usage block.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_cluster_arguments", "connect_kwargs"]


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--cluster``, the local cluster's size and the TLS files to ``parser``."""
    g = parser.add_argument_group("cluster")
    g.add_argument("--cluster", metavar="SPEC", default=None,
                   help="local (default), threads, local-cuda, slurm, tls://host:port, "
                        "tcp://host:port or scheduler-file:PATH")
    g.add_argument("--n-workers", metavar="N", default=None,
                   help="worker processes of a local cluster")
    g.add_argument("--threads-per-worker", metavar="N", default=None,
                   help="threads of each worker of a local cluster")
    g.add_argument("--memory-limit", metavar="SIZE", default=None,
                   help="per worker of a local cluster: 4GiB, 0.5 (of the machine), auto or 0")
    g.add_argument("--tls", action="store_true", default=None,
                   help="start the local cluster with TLS and temporary certificates")
    g.add_argument("--tls-ca", metavar="FILE", default=None,
                   help="CA certificate of the cluster (PEM); default "
                        "distributed.comm.tls.ca-file")
    g.add_argument("--tls-cert", metavar="FILE", default=None,
                   help="client certificate (PEM), signed by that CA; default "
                        "distributed.comm.tls.client.cert")
    g.add_argument("--tls-key", metavar="FILE", default=None,
                   help="private key of the client certificate, unless it is in --tls-cert")


def connect_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Check the cluster flags of ``args``; return keyword arguments for ``connect``.

    Raises :class:`~engine.errors.SpecError` naming the flag, before any cluster starts.

    >>> parser = argparse.ArgumentParser(); add_cluster_arguments(parser)
    >>> connect_kwargs(parser.parse_args(["--cluster", "threads", "--n-workers", "2"]))
    {'spec': 'threads', 'n_workers': 2, 'threads_per_worker': None, 'memory_limit': None, 'security': None, 'tls': None}
    """  # noqa: E501
    from engine.cluster import check_cluster_options, parse_spec
    from engine.errors import SpecError

    spec = getattr(args, "cluster", None)
    kind = parse_spec(spec)[0] if spec is not None else None
    n_workers, threads, memory = check_cluster_options(
        getattr(args, "n_workers", None), getattr(args, "threads_per_worker", None),
        getattr(args, "memory_limit", None), source="cli")
    if kind in ("address", "scheduler-file"):
        for flag, value in (("--n-workers", n_workers), ("--threads-per-worker", threads),
                            ("--memory-limit", memory), ("--tls", getattr(args, "tls", None))):
            if value is not None:
                raise SpecError(f"{flag} applies to local clusters only; a cluster at {spec} "
                                "is sized and secured where it runs: leave {flag} out"
                                .replace("{flag}", flag))

    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    security = None
    if ca or cert or key:
        if not (ca and cert):
            missing = "--tls-ca" if not ca else "--tls-cert"
            raise SpecError(f"{missing} is missing: TLS needs the cluster's CA (--tls-ca) and "
                            "a client certificate (--tls-cert, with --tls-key unless the key "
                            "is in the certificate file)")
        from engine.security import tls_security

        security = tls_security(ca, cert, key)
    return {"spec": spec, "n_workers": n_workers, "threads_per_worker": threads,
            "memory_limit": memory, "security": security,
            "tls": getattr(args, "tls", None)}
