"""Plots of clusterings (matplotlib, Agg): dendrogram, PCA as RGB, NMI against scale."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import SpecError
from engine.ml.cluster._arrays import _is_dask
from engine.ml.cluster.fitting import PCAResult, pca

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.figure import Figure

__all__ = ["dendrogram_plot", "pca_rgb", "pca_rgb_plot", "nmi_vs_scale_plot"]


# -------------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def dendrogram_plot(linkage: np.ndarray, n_leaves: int | None = None,
                    example_tiles: Mapping[int, Sequence[np.ndarray]] | None = None,
                    n_examples: int = 3, path: str | os.PathLike[str] | None = None) -> Figure:
    """Dendrogram of a Ward linkage cut to ``n_leaves`` leaves, with example tiles per leaf.

    ``example_tiles`` maps a cluster label as numbered by :func:`ward` for the same
    ``n_leaves`` to a sequence of 2-D (grey) or ``(y, x, 3)`` (RGB) images; up to
    ``n_examples`` are drawn in a column under each leaf. Saved to ``path`` if given.
    """
    from scipy.cluster.hierarchy import dendrogram, fcluster  # type: ignore[import-untyped]

    plt = _pyplot()
    n_obs = linkage.shape[0] + 1
    p = n_leaves or min(n_obs, 30)
    rows = n_examples if example_tiles else 0
    fig = plt.figure(figsize=(max(6.0, 1.2 * p), 3.0 + 1.2 * rows))
    grid = fig.add_gridspec(1 + rows, p, height_ratios=[2.5] + [1.0] * rows)
    ax = fig.add_subplot(grid[0, :])
    tree = dendrogram(linkage, truncate_mode="lastp", p=p, ax=ax, no_labels=example_tiles
                      is not None, color_threshold=0)
    ax.set_ylabel("Ward distance")
    if example_tiles:
        raw = fcluster(linkage, p, criterion="maxclust")
        _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
        ward_label = np.argsort(np.argsort(first))[inverse]
        members = _leaf_members(linkage, n_obs)
        for col, node in enumerate(tree["leaves"]):
            label = int(ward_label[members(node)[0]])
            tiles = list(example_tiles.get(label, []))[:n_examples]
            for r in range(rows):
                tax = fig.add_subplot(grid[1 + r, col])
                tax.set_axis_off()
                if r < len(tiles):
                    tile = np.asarray(tiles[r])
                    tax.imshow(tile, cmap="gray" if tile.ndim == 2 else None)
                if r == 0:
                    tax.set_title(f"cluster {label}", fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def _leaf_members(linkage: np.ndarray, n_obs: int) -> Callable[[int], list[int]]:
    def members(node: int) -> list[int]:
        out, stack = [], [node]
        while stack:
            v = stack.pop()
            if v < n_obs:
                out.append(v)
            else:
                row = linkage[v - n_obs]
                stack += [int(row[0]), int(row[1])]
        return out

    return members


def pca_rgb(embeddings: Any, positions: Any, grid: tuple[Any, Any],
            pca_result: PCAResult | None = None, clip: tuple[float, float] = (2.0, 98.0),
            dims: tuple[str, str] = ("y", "x")) -> xr.DataArray:
    """A map whose colour is the first three principal components of each tile.

    ``positions (n, 2)`` are each tile's centre coordinates (``dims`` order) and ``grid``
    the two 1-D coordinate vectors of the map; each tile lands on the grid point nearest
    its centre. Components are scaled to 0..1 between the ``clip`` percentiles. Returns
    ``rgb (y, x, band)`` with NaN where no tile lies (``pca_rgb_plot`` draws it).
    """
    import xarray as xr

    emb = np.asarray(embeddings.compute() if _is_dask(embeddings) else embeddings, dtype=float)
    pos = np.asarray(positions, dtype=float)
    if pos.shape != (emb.shape[0], 2):
        raise SpecError(f"pca_rgb: positions must be (n, 2) = ({emb.shape[0]}, 2); "
                        f"got {pos.shape}")
    if emb.shape[1] < 3:
        raise SpecError("pca_rgb: embeddings need at least 3 dimensions")
    p = pca_result or pca(emb, 3)
    comps = p.transform(emb)[:, :3]
    lo, hi = np.percentile(comps, clip, axis=0)
    scaled = np.clip((comps - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    ys, xs = (np.asarray(g, dtype=float) for g in grid)
    rgb = np.full((ys.size, xs.size, 3), np.nan)
    iy = np.abs(ys[None, :] - pos[:, :1]).argmin(1)
    ix = np.abs(xs[None, :] - pos[:, 1:]).argmin(1)
    rgb[iy, ix] = scaled
    return xr.DataArray(rgb, dims=(*dims, "band"),
                        coords={dims[0]: ys, dims[1]: xs, "band": ["pc1", "pc2", "pc3"]},
                        name="pca_rgb")


def pca_rgb_plot(rgb: xr.DataArray, path: str | os.PathLike[str] | None = None) -> Figure:
    """Draw a :func:`pca_rgb` map (NaN shown white); saved to ``path`` if given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6 * rgb.shape[0] / max(rgb.shape[1], 1) + 0.5))
    img = np.nan_to_num(np.asarray(rgb.values, dtype=float), nan=1.0)
    y, x = (np.asarray(rgb[d].values, dtype=float) for d in rgb.dims[:2])
    ax.imshow(img, origin="lower" if y.size > 1 and y[1] > y[0] else "upper",
              extent=(x.min(), x.max(), y.min(), y.max()), aspect="auto")
    ax.set_xlabel(str(rgb.dims[1]))
    ax.set_ylabel(str(rgb.dims[0]))
    ax.set_title("first three principal components as RGB")
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def nmi_vs_scale_plot(table: Sequence[Mapping[str, Any]], unit: str = "px",
                      path: str | os.PathLike[str] | None = None) -> Figure:
    """NMI (with its bootstrap 95 % interval) against tile size, from :func:`nmi_vs_scale`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    s = np.array([float(r["scale"]) for r in table])
    v = np.array([r["nmi"] for r in table])
    lo = np.array([r["nmi"] if r["nmi_low"] is None else r["nmi_low"] for r in table])
    hi = np.array([r["nmi"] if r["nmi_high"] is None else r["nmi_high"] for r in table])
    ax.errorbar(s, v, yerr=[v - lo, hi - v], marker="o", capsize=3)
    ax.set_xlabel(f"tile size ({unit})")
    ax.set_ylabel("NMI (arithmetic)")
    ax.set_ylim(0, 1)
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig
