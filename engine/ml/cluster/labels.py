"""Reference labels: the Kaggle "Understanding Clouds" layout and its run-length masks."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import SpecError

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["rle_decode", "rle_encode", "read_understanding_clouds", "masks_to_labels"]


# ------------------------------------------------------------------------------- labels


def rle_decode(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle run-length string into a boolean ``(height, width)`` mask.

    Pairs ``start length`` with 1-based starts over pixels numbered **column-major**
    (down the first column, then the next). An empty string, ``None`` or NaN is an
    empty mask.

    >>> rle_decode("2 2 6 1", (3, 2)).astype(int).tolist()
    [[0, 0], [1, 0], [1, 1]]
    """
    h, w = shape
    flat = np.zeros(h * w, dtype=bool)
    if rle is None or (isinstance(rle, float) and math.isnan(rle)) or not str(rle).strip():
        return flat.reshape((h, w), order="F")
    nums = np.asarray(str(rle).split(), dtype=np.int64)
    if nums.size % 2:
        raise SpecError(f"run-length string has an odd number of values: {str(rle)[:60]!r}")
    starts, lengths = nums[0::2] - 1, nums[1::2]
    if (starts < 0).any() or (lengths < 0).any() or (starts + lengths > h * w).any():
        raise SpecError(f"run-length string runs outside a {h}x{w} image: {str(rle)[:60]!r}")
    for s, n in zip(starts, lengths, strict=True):
        flat[s:s + n] = True
    return flat.reshape((h, w), order="F")


def rle_encode(mask: np.ndarray) -> str:
    """Inverse of :func:`rle_decode` (column-major, 1-based ``start length`` pairs)."""
    flat = np.concatenate([[0], np.asarray(mask, dtype=np.int8).ravel(order="F"), [0]])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends, strict=True))


def read_understanding_clouds(csv_path: str | os.PathLike[str], image_dir: str | os.PathLike[str],
                              classes: Sequence[str] | None = None,
                              shape: tuple[int, int] | None = None) -> xr.DataArray:
    """Masks of the Kaggle "Understanding Clouds" layout as a lazy ``(image, label, y, x)``
    boolean DataArray (one dask chunk per image: the real set is ~65 GB as booleans).

    ``csv_path`` has the columns ``Image_Label,EncodedPixels`` with ``Image_Label`` =
    ``<image file>_<class>`` and run-length masks as in :func:`rle_decode`. The image size
    is read from each file's header in ``image_dir`` (or given as ``shape``); all images
    must share it. ``classes`` defaults to the classes in the CSV, sorted.
    """
    import dask
    import dask.array as da
    import xarray as xr

    rles: dict[str, dict[str, str]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"Image_Label", "EncodedPixels"} <= set(
                reader.fieldnames):
            raise SpecError(f"{csv_path}: needs the columns Image_Label,EncodedPixels")
        for row in reader:
            image, sep, cls = row["Image_Label"].rpartition("_")
            if not sep:
                raise SpecError(f"{csv_path}: Image_Label {row['Image_Label']!r} is not "
                                "'<image>_<class>'")
            rles.setdefault(image, {})[cls] = row["EncodedPixels"] or ""
    images = sorted(rles)
    labels = list(classes) if classes is not None else sorted({c for r in rles.values()
                                                               for c in r})
    if shape is None:
        from PIL import Image

        sizes = set()
        for image in images:
            with Image.open(os.path.join(image_dir, image)) as im:
                sizes.add((im.height, im.width))
        if len(sizes) != 1:
            raise SpecError(f"images in {image_dir} differ in size {sorted(sizes)}: pass shape=")
        shape = sizes.pop()
    h, w = shape

    def decode(image: str) -> np.ndarray:
        return np.stack([rle_decode(rles[image].get(c, ""), (h, w)) for c in labels])[None]

    blocks = [da.from_delayed(dask.delayed(decode)(im), (1, len(labels), h, w), dtype=bool)
              for im in images]
    data = da.concatenate(blocks, axis=0) if blocks else da.zeros((0, len(labels), h, w), bool)
    return xr.DataArray(data, dims=("image", "label", "y", "x"),
                        coords={"image": images, "label": labels}, name="mask")


def masks_to_labels(masks: xr.DataArray, label_dim: str = "label") -> xr.DataArray:
    """One class per pixel from per-class masks (e.g. :func:`read_understanding_clouds`).

    The result (``masks``' dims without ``label_dim``, int8, lazy for lazy input) is the
    index of the class along ``label_dim`` where exactly one mask is set, and -1 where none
    is or where masks overlap (the Kaggle rectangles of different classes may overlap;
    such pixels have no single label to score against). The class names are kept in the
    attribute ``flag_meanings`` (CF), their indices in ``flag_values``.
    """
    if label_dim not in masks.dims:
        raise SpecError(f"masks_to_labels: {label_dim!r} is not a dim of {masks.dims}")
    m = masks.astype(bool)
    count = m.sum(label_dim)
    index = m.argmax(label_dim)
    out = index.where(count == 1, -1).astype(np.int8)
    names = [str(v) for v in masks[label_dim].values] if label_dim in masks.coords else [
        str(i) for i in range(masks.sizes[label_dim])]
    out.attrs = {"long_name": "class of the pixel (-1: none or several)",
                 "flag_values": list(range(len(names))), "flag_meanings": " ".join(names)}
    return out.rename("label")
