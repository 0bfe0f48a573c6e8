"""``cube-engine verify URL [--json]``: check an output store against its manifest.

Exit codes: 0 every region intact, 1 some region damaged or unfinished (listed), 2 bad
input (nothing there, not a store the engine wrote, unreachable).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["add_parser", "run"]


def add_parser(subparsers, parents: Sequence[argparse.ArgumentParser] = ()
               ) -> argparse.ArgumentParser:
    """Add the ``verify`` verb to a ``cube-engine`` parser's subparsers."""
    p = subparsers.add_parser(
        "verify", parents=list(parents),
        help="check an output store against its manifest: every region there, intact, "
             "unchanged (exit 1 when some region is damaged)")
    p.add_argument("url", metavar="URL", help="output store written by cube-engine")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-checksums", dest="checksums", action="store_false",
                   help="check objects and sizes only (one listing, no data read)")
    return p


def run(args: argparse.Namespace) -> int:
    """Verify ``args.url``; print the result; return the exit code."""
    from engine.errors import EngineError
    from engine.io.verify import verify
    from engine.redact import redact_text, redact_url

    try:
        res = verify(args.url, checksums=getattr(args, "checksums", True))
    except EngineError as err:
        if getattr(args, "debug", False):
            raise
        print(f"cube-engine: error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    elif res.ok:
        how = "checksums compared" if res.checksums else "objects and sizes checked"
        print(f"ok: {redact_url(res.url)}: all {res.n_regions} regions intact ({how})")
    else:
        print(f"damaged: {redact_url(res.url)}: {len(res.damaged)} of {res.n_regions} "
              "regions; re-running the write redoes unfinished, missing and torn (size) "
              "regions; for checksum or unreadable ones delete their records "
              "(.engine/manifest/ID.json) first")
        for d in res.damaged:
            print(f"  {d.describe()}")
    return 0 if res.ok else 1
