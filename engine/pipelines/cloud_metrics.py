"""The cloud-metrics job (document 004, issue 12 section 5): organisation metrics per tile
and time step of a thresholded variable, written to Zarr.

A kind on the job interface (:mod:`engine.pipelines.job`) with no model: open the cube and
check the variable, tile and metrics against it (``prepare``) -> nothing to split or train
-> :func:`engine.ops.organisation.organisation_metrics`, lazily (``predict``; the runner
writes it resumably) -> per-metric summaries over the written tiles (``evaluate``) -> a map
of the mask and two metrics, and the table (``report``).

Input
    Any catalog entry. The shipped job reads ``catalogs/clouds.yaml``'s ``msg_ir``: the
    MSG 10.8 micron brightness-temperature image (EUMETSAT, 2016-05-16 12 UTC; 160 x 256
    pixels of about 35.5 km on a polar stereographic grid) from ``iris-sample-data``
    2.5.2, converted to Zarr by :func:`convert_msg_sample` (``python -m
    engine.pipelines.cloud_metrics`` regenerates it): cold cloud tops are ``bt < 260 K``.
    Pixel sizes are those of the projection plane (its scale factor varies over the
    image).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr

from engine.dims import cube_dims
from engine.errors import SpecError
from engine.kernels.organisation import METRICS
from engine.ops.organisation import organisation_metrics
from engine.ops.stats import check_variables
from engine.pipelines.job import Job, Prepared, Report, RunContext, Trained, open_input
from engine.pipelines.spec import InputSpec, JobSpecBase, OutputSpec, TrackingSpec

__all__ = ["CloudMaskSpec", "CloudMetricsSpec", "CloudMetrics", "convert_msg_sample",
           "plot_metrics", "JOB"]

#: The MSG image in iris-sample-data and its variable there.
MSG_FILE, MSG_VARIABLE = "toa_brightness_stereographic.nc", "data"


@dataclass(frozen=True)
class CloudMaskSpec:
    """Cloud where ``variable > threshold`` (``above: true``) or ``< threshold``."""

    variable: str
    threshold: float
    above: bool = True


@dataclass(frozen=True)
class CloudMetricsSpec(JobSpecBase):
    """Organisation metrics of ``mask`` per tile (pixels, or ``"100km"``) and time step."""

    name: str
    input: InputSpec
    mask: CloudMaskSpec
    tile: dict[str, int | str]
    output: OutputSpec
    kind: Literal["cloud-metrics"] = "cloud-metrics"
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    connectivity: Literal[4, 8] = 4
    min_objects: int = 50
    #: Pixel sizes in km; default from the cube's coordinates.
    dx: float | None = None
    dy: float | None = None
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    seed: int = 0
    base_dir: str = "."

    def check(self) -> None:
        super().check()
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise SpecError(f"metrics: unknown {unknown or '[]'}; choose from "
                            f"{', '.join(METRICS)}")
        if self.min_objects < 2:
            raise SpecError(f"min_objects must be >= 2, got {self.min_objects}")
        for k, v in (("dx", self.dx), ("dy", self.dy)):
            if v is not None and not v > 0:
                raise SpecError(f"{k} must be > 0 km, got {v}")
        if len(self.tile) != 2:
            raise SpecError(f"tile must give the two horizontal dims, e.g. {{y: 20, x: 32}} "
                            f"or {{lat: 100km, lon: 100km}}, got {self.tile}")


def convert_msg_sample(dest: str) -> str:
    """Write iris-sample-data's MSG image as a Zarr store at ``dest``: ``bt (time, y, x)``
    in K (one time step), projected ``y``/``x`` in m, ``lat``/``lon`` of each pixel,
    Blosc-zstd; returns ``dest``."""
    from zarr.codecs import BloscCodec

    from engine.io.archive_sample import sample_dir

    path = os.path.join(sample_dir(), MSG_FILE)
    with xr.open_dataset(path) as src:
        ds = src.load()
    bt = ds[MSG_VARIABLE].expand_dims("time").astype(np.float32)
    bt.attrs = {"standard_name": "toa_brightness_temperature",
                "long_name": "TOA brightness temperature, 10.80 micron (MSG SEVIRI)",
                "units": "K"}
    out = xr.Dataset({"bt": bt})
    out.attrs = {k: ds.attrs[k] for k in ("title", "source", "institution", "platform",
                                          "instrument", "acknowledgement", "Note")}
    out.attrs["license"] = ("UK Open Government Licence (iris-sample-data's data licence, "
                            "Met Office); image courtesy of EUMETSAT, for test purposes only")
    out.attrs["projection"] = json.dumps({k: (v.item() if hasattr(v, "item") else v)
                                          for k, v in ds["stereographic"].attrs.items()})
    out.attrs["history"] = (f"{ds.attrs.get('history', '')}; converted from "
                            f"iris-sample-data 2.5.2 {MSG_FILE} by "
                            "engine.pipelines.cloud_metrics.convert_msg_sample")
    comp = BloscCodec(cname="zstd", clevel=7, shuffle="shuffle")
    enc = {"bt": {"chunks": (1, 80, 128), "compressors": (comp,)},
           "lat": {"compressors": (comp,)}, "lon": {"compressors": (comp,)}}
    with warnings.catch_warnings():  # consolidated metadata: read by every reader we use
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        out.to_zarr(dest, mode="w", encoding=enc, consolidated=True, zarr_format=3)
    return dest


@dataclass(kw_only=True)
class CloudPrepared(Prepared):
    spec: CloudMetricsSpec


class CloudMetrics(Job):
    name = "cloud-metrics"
    summary = "cloud-organisation metrics per tile and time step of a thresholded variable"
    title = "cloud-organisation metrics"
    spec = CloudMetricsSpec

    def prepare(self, spec: CloudMetricsSpec) -> CloudPrepared:  # type: ignore[override]
        base = open_input(spec)
        check_variables(base.ds, [spec.mask.variable], "mask.variable")
        dims = cube_dims(base.ds[spec.mask.variable], spec.input.dims)
        dims.horizontal  # noqa: B018 -- raises a one-line CubeError naming input.dims
        p = CloudPrepared(**{**vars(base), "spec": spec, "dims": dims})
        # every name and size is checked here, lazily, so validate finds what a run would
        self._metrics(p)
        return p

    def _metrics(self, p: CloudPrepared) -> xr.Dataset:
        s = p.spec
        return organisation_metrics(
            p.ds, s.mask.variable, threshold=s.mask.threshold, above=s.mask.above,
            tile=s.tile, metrics=s.metrics, dx=s.dx, dy=s.dy, connectivity=s.connectivity,
            min_objects=s.min_objects, dims=s.input.dims)

    def describe(self, p: Prepared) -> str:
        s = p.spec
        return (f"{s.mask.variable} {'>' if s.mask.above else '<'} {s.mask.threshold:g}, "
                f"tiles {s.tile}; cube {dict(p.ds.sizes)}")

    def train(self, p: Prepared, split: Any, ctx: RunContext) -> Trained:
        return Trained(model=None, info={"model": "none: metrics only"},
                       model_hash="none", fresh=ctx.previous is None)

    def predict(self, p: CloudPrepared, split: Any,  # type: ignore[override]
                trained: Trained, ctx: RunContext) -> xr.Dataset:
        out = self._metrics(p)
        out.attrs["engine_mask_variable"] = p.spec.mask.variable
        return out

    def evaluate(self, p: CloudPrepared, split: Any,  # type: ignore[override]
                 trained: Trained, written: xr.Dataset, ctx: RunContext) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for m in p.spec.metrics:
            v = np.asarray(written[m].values, dtype=float).ravel()
            ok = v[np.isfinite(v)]
            summary[m] = {"units": written[m].attrs.get("units", ""),
                          "n_tiles": int(v.size), "n_finite": int(ok.size),
                          "mean": float(ok.mean()) if ok.size else None,
                          "min": float(ok.min()) if ok.size else None,
                          "max": float(ok.max()) if ok.size else None}
        return {"job": p.spec.name, "mask": written.attrs.get("engine_mask"),
                "tile_pixels": written.attrs.get("engine_tile_pixels"),
                "tile_km": written.attrs.get("engine_tile_km"),
                "connectivity": p.spec.connectivity, "metrics": summary}

    def report(self, p: CloudPrepared, split: Any, trained: Trained,  # type: ignore[override]
               metrics: dict[str, Any], written: xr.Dataset, ctx: RunContext) -> Report:
        path = ctx.path("metrics.png")
        plot_metrics(p, written, path)

        def fmt(x: float | None) -> str:
            return "nan" if x is None else f"{x:.4g}"

        rows = [[m, v["units"], f"{v['n_finite']}/{v['n_tiles']}", fmt(v["mean"]),
                 fmt(v["min"]), fmt(v["max"])] for m, v in metrics["metrics"].items()]
        return Report(title=f"{p.spec.name}: {metrics['mask']}, tiles "
                            f"{metrics['tile_km'][0]:g} x {metrics['tile_km'][1]:g} km",
                      columns=["metric", "units", "tiles", "mean", "min", "max"], rows=rows,
                      files={"metrics_plot": path},
                      summary={f"{m}_mean": v["mean"] for m, v in metrics["metrics"].items()})


def plot_metrics(p: CloudPrepared, written: xr.Dataset, path: str) -> str:
    """The first time step's mask and up to two metrics (Iorg and cloud fraction when
    computed) as tile maps."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = p.spec
    y, x = p.dims.horizontal if p.dims is not None else ("y", "x")
    var = p.ds[s.mask.variable]
    rest = {d: 0 for d in var.dims if d not in (y, x)}
    field = var.isel(rest).transpose(y, x).compute()
    shown = [m for m in ("iorg", "cloud_fraction", *s.metrics) if m in s.metrics][:2]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(5 * (1 + len(shown)), 4), dpi=100)
    axes = np.atleast_1d(axes)
    cloud = field < s.mask.threshold if not s.mask.above else field > s.mask.threshold
    # missing pixels (which make a tile NaN) in blue
    grey = plt.get_cmap("Greys_r").with_extremes(bad="lightsteelblue")
    axes[0].imshow(np.where(field.notnull(), cloud, np.nan), cmap=grey,
                   interpolation="nearest")
    axes[0].set_title(f"mask: {written.attrs.get('engine_mask')} (white; blue: missing)",
                      fontsize=9)
    for ax, m in zip(axes[1:], shown, strict=False):
        w = written[m]
        w = w.isel({d: 0 for d in w.dims if d not in ("tile_y", "tile_x")})
        im = ax.imshow(w.values, interpolation="nearest")
        fig.colorbar(im, ax=ax, label=w.attrs.get("units", ""))
        ax.set_title(m, fontsize=9)
    fig.suptitle(s.name)
    fig.savefig(path)
    plt.close(fig)
    return path


JOB = CloudMetrics().as_kind()


if __name__ == "__main__":  # pragma: no cover
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(convert_msg_sample(os.path.join(here, "catalogs", "data", "msg_ir.zarr")))
