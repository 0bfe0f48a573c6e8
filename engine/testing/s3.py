"""An S3 server on 127.0.0.1 for tests and benchmarks (moto's server, real HTTP).

>>> with moto_s3() as s3:                       # doctest: +SKIP
...     write(ds, s3.url("out.zarr"), storage_options=s3.storage_options)

The server runs in a thread of the calling process; worker processes reach it over
HTTP like any S3 endpoint, with the endpoint and credentials given only through
``storage_options``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from engine.errors import require

__all__ = ["S3Server", "moto_s3"]


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and one bucket on it."""

    endpoint_url: str
    bucket: str
    storage_options: dict[str, Any] = field(repr=False)

    def url(self, path: str = "") -> str:
        """``s3://`` URL of ``path`` inside the bucket."""
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def filesystem(self):
        """An ``s3fs.S3FileSystem`` talking to this server."""
        s3fs = require("s3fs", "s3")
        return s3fs.S3FileSystem(**self.storage_options)


@contextmanager
def moto_s3(bucket: str | None = None) -> Iterator[S3Server]:
    """Start moto's S3 server on a free port of 127.0.0.1 with one empty bucket.

    Parameters
    ----------
    bucket
        Bucket name; default a unique one (moto's backend is shared per process).

    Yields
    ------
    S3Server
        ``storage_options`` carry dummy credentials and the endpoint, so nothing is
        read from the environment.
    """
    require("s3fs", "s3")
    server_mod = require("moto.server", "test")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    log = logging.getLogger("werkzeug")  # one line per request otherwise
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {
            "key": "cube-engine-test",
            "secret": "cube-engine-test",
            "client_kwargs": {"endpoint_url": endpoint},
            "use_listings_cache": False,
        }
        s3 = S3Server(endpoint, bucket or f"cube-engine-{uuid.uuid4().hex[:12]}", options)
        s3.filesystem().mkdir(s3.bucket)
        yield s3
    finally:
        server.stop()
        log.setLevel(level)
