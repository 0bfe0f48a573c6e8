"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--size tiny|default|large]``.

Each benchmark compares the engine against a named baseline in the same run, prints a
table with the ratio and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "patches": "benchmarks.bench_patches",
    "predict": "benchmarks.bench_predict",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("names", nargs="*", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--size", default="default", choices=["tiny", "default", "large"])
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    for name in args.names or list(BENCHMARKS):
        mod = importlib.import_module(BENCHMARKS[name])
        mod.main([args.size])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
