"""Wait until a dask scheduler accepts connections: the init container of a job pod.

The operator starts the scheduler and the job pod together; ``cube-engine run --cluster``
fails at once (one line, exit 2) when nothing answers, and a scheduler whose image is
still being pulled answers nothing for minutes. So the job pod first runs::

    python -m engine.deploy.wait --timeout 600    # address from $DASK_SCHEDULER_ADDRESS

which returns as soon as the scheduler's Service accepts a TCP connection (it has
endpoints only once the scheduler is ready), and exits 1 with one line after the timeout.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from urllib.parse import urlsplit

__all__ = ["wait_for_scheduler", "main"]

ENV = "DASK_SCHEDULER_ADDRESS"


def wait_for_scheduler(address: str, timeout: float, interval: float = 2.0) -> float:
    """Seconds until ``address`` (``tcp://host:port``) accepted a connection.

    Raises :class:`TimeoutError` after ``timeout`` seconds and :class:`ValueError` for an
    address without host or port.
    """
    parts = urlsplit(address)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{address!r} is not a scheduler address: write tcp://HOST:PORT")
    t0 = time.monotonic()
    while True:
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=interval):
                return time.monotonic() - t0
        except OSError as err:
            if time.monotonic() - t0 + interval > timeout:
                raise TimeoutError(f"no scheduler at {address} after {timeout:g} s "
                                   f"({err.strerror or err})") from None
            time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    """Wait for ``$DASK_SCHEDULER_ADDRESS`` (or ``--address``); 0 when it answers."""
    p = argparse.ArgumentParser(prog="python -m engine.deploy.wait", description=__doc__)
    p.add_argument("--address", default=os.environ.get(ENV))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between tries")
    args = p.parse_args(argv)
    if not args.address:
        print(f"wait: no address: set {ENV} or pass --address tcp://HOST:PORT",
              file=sys.stderr)
        return 2
    try:
        took = wait_for_scheduler(args.address, args.timeout, args.interval)
    except (TimeoutError, ValueError) as err:
        print(f"wait: {err}: check the scheduler pod (kubectl describe pod, kubectl logs)",
              file=sys.stderr)
        return 1
    print(f"scheduler at {args.address} answers (after {took:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
