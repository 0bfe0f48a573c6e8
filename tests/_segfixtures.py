"""Scaffolding of the patch kinds' tests (``segment``, ``classify``): the committed 0.5-degree
land-cover cube coarsened to a few seconds' worth, and a shipped job run on it from the
command line. The cube is the session fixture ``small_landcover`` (tests/conftest.py)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import xarray as xr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOG = os.path.join(ROOT, "catalogs", "landcover.yaml")


def small_catalog(tmp_path, factor: int = 4, chunks: int = 4) -> str:
    """A catalog (entry ``small``) of the committed 0.5-degree cube coarsened ``factor``
    times (block mean / majority), in dask chunks of ``1 / chunks`` of each dim: the
    reduced grid of the end-to-end tests (90 x 180 cells by default)."""
    from engine.io.catalog import open_cube
    from engine.io.landcover import majority_regrid, mean_regrid

    ds = open_cube(CATALOG, "landcover_0p5").load()
    ny, nx = ds.sizes["lat"] // factor, ds.sizes["lon"] // factor
    out = xr.Dataset(
        {v: (("lat", "lon"), mean_regrid(ds[v].values, (ny, nx)).astype(np.float32))
         for v in ("red", "green", "blue", "relief")},
        coords={"lat": ds.lat.values.reshape(ny, factor).mean(1),
                "lon": ds.lon.values.reshape(nx, factor).mean(1)})
    out["landcover"] = (("lat", "lon"), majority_regrid(ds.landcover.values, (ny, nx)))
    out["landcover"].attrs = dict(ds.landcover.attrs)
    out.lat.attrs, out.lon.attrs = dict(ds.lat.attrs), dict(ds.lon.attrs)
    out.attrs = {k: v for k, v in ds.attrs.items() if not k.startswith("engine_")}
    store = tmp_path / "small.zarr"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", module="zarr")
        out.chunk({"lat": ny // chunks, "lon": nx // chunks}).to_zarr(
            store, zarr_format=3, consolidated=True)
    cat = tmp_path / "small.yaml"
    cat.write_text(f"""version: 2
data:
  small: {{datatype: 'intake.readers.datatypes:Zarr', kwargs: {{url: {store}}}}}
entries:
  small:
    reader: 'intake.readers.readers:XArrayDatasetReader'
    kwargs: {{args: ['{{data(small)}}'], consolidated: true}}
""")
    return str(cat)


def on_small(cat: str) -> list[str]:
    """The ``--set`` arguments that point a shipped job at the catalog of
    :func:`small_catalog`."""
    return ["--set", f"input.catalog={cat}", "--set", "input.entry=small"]


def run_small(job: str, out, cat: str, *args: str) -> int:
    """Run ``job`` on the reduced cube into ``out`` (threads, quiet); its exit code."""
    from engine._cli.main import main

    return main(["run", job, "--cluster", "threads", "--quiet", "--output", str(out),
                 *on_small(cat), *args])


def run_folder(out) -> str:
    """The run folder beside the store ``out`` (``<name>.run``)."""
    return str(out)[:-5] + ".run"
