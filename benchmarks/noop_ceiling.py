"""The engine's own per-tile cost (predict with a no-op model) of this checkout against
another revision's, in the same run.

``git worktree add /tmp/base REV`` then ``python -m benchmarks.noop_ceiling /tmp/base``:
both checkouts predict the same 8 x 512 x 512 x 3 cube (one chunk per step, 64 px tiles,
50 % overlap, batches of 256) with a model that returns its first input channel, on one
thread with the synchronous scheduler, in fresh interpreters taking turns (so load from
other processes hits both), and the ratio of tiles/s is the median of the per-round
ratios. The figure issue 9 asks for: this checkout against the graph of ``e8c3099``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from benchmarks._common import RESULTS, machine

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from torch import nn
torch.set_num_threads(1)
from engine import meter
from engine.ml.predict import predict
from engine.testing.cubes import synthetic_cube

class FirstChannel(nn.Module):
    def forward(self, x):
        return x[:, :1]

ds = synthetic_cube({"time": 8, "lat": 512, "lon": 512}, chunks={"time": 1},
                    variables=("t2m", "lst", "ndvi")).persist(scheduler="threads")
out = predict(ds, FirstChannel(), tile={"lat": 64, "lon": 64}, overlap=0.5, batch_size=256)
out.data.compute(scheduler="sync")
meter.reset()
out.data.compute(scheduler="sync")
tiles = meter.snapshot()["local"]["kinds"]["predict"]["items"]
best = float("inf")
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    out.data.compute(scheduler="sync")
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"tiles": tiles, "seconds": best}))
"""


def _one(root: str, repeats: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, root, str(repeats)], check=True,
                         capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _revision(root: str) -> str:
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(base: str, rounds: int = 5, repeats: int = 5) -> dict[str, Any]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(base, "engine", "ml", "predict.py")):
        raise SystemExit(f"noop_ceiling: {base} is not a cube-engine checkout "
                         "(no engine/ml/predict.py)")
    this, other, ratios = [], [], []
    for _ in range(rounds):
        a, b = _one(here, repeats), _one(base, repeats)
        if a["tiles"] != b["tiles"]:
            raise SystemExit(f"the checkouts run different grids ({a['tiles']} vs "
                             f"{b['tiles']} tiles): not comparable")
        this.append(a["tiles"] / a["seconds"])
        other.append(b["tiles"] / b["seconds"])
        ratios.append(this[-1] / other[-1])
    return {"benchmark": "noop_ceiling", "machine": machine(), "tiles": a["tiles"],
            "this": {"revision": _revision(here), "tiles_per_s": statistics.median(this)},
            "base": {"revision": _revision(base), "tiles_per_s": statistics.median(other)},
            "ratio": statistics.median(ratios), "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="a checkout of the revision to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    res = run(args.base, args.rounds)
    print(f"no-op model, 1 thread, {res['tiles']} tiles: this checkout "
          f"({res['this']['revision']}) {res['this']['tiles_per_s']:,.0f} tiles/s, "
          f"{res['base']['revision']} {res['base']['tiles_per_s']:,.0f} tiles/s: "
          f"ratio {res['ratio']:.2f} (rounds {', '.join(f'{r:.2f}' for r in res['ratios'])})")
    path = os.path.join(RESULTS, f"noop_ceiling-vs-{res['base']['revision']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"written {path}")


if __name__ == "__main__":
    main()
