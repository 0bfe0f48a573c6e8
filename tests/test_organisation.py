"""Cloud-organisation metrics: the kernels on analytic fixtures, the cube operator, the job."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import CubeError, SpecError
from engine.kernels import organisation as K
from engine.ops.organisation import organisation_metrics
from engine.testing.checks import raise_if_dask_computes


def _discs(shape: tuple[int, int], dx: float, dy: float,
           discs: list[tuple[float, float, float]]) -> np.ndarray:
    """A mask with discs ``(x, y, r)`` given in physical units, sampled at pixel centres."""
    ny, nx = shape
    x = (np.arange(nx) + 0.5) * dx
    y = (np.arange(ny) + 0.5) * dy
    xx, yy = np.meshgrid(x, y)
    m = np.zeros(shape, bool)
    for cx, cy, r in discs:
        m |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    return m


def _rects(shape: tuple[int, int], dx: float, dy: float,
           rects: list[tuple[float, float, float, float]]) -> np.ndarray:
    """A mask with rectangles ``(x0, y0, width, height)`` in physical units."""
    ny, nx = shape
    x = (np.arange(nx) + 0.5) * dx
    y = (np.arange(ny) + 0.5) * dy
    xx, yy = np.meshgrid(x, y)
    m = np.zeros(shape, bool)
    for x0, y0, w, h in rects:
        m |= (xx > x0) & (xx < x0 + w) & (yy > y0) & (yy < y0 + h)
    return m


# --- Iorg on point processes ----------------------------------------------------------


def test_iorg_poisson_lattice_clustered() -> None:
    rng = np.random.default_rng(12)
    w, h, n = 50.0, 20.0, 400
    sigma = np.sqrt(1 / 12 / n)  # standard error of a mean of n uniforms
    poisson = [K.iorg_points(rng.uniform([0, 0], [w, h], (n, 2)), w, h, periodic=True)
               for _ in range(20)]
    assert abs(np.mean(poisson) - 0.5) < 3 * sigma / np.sqrt(20) + 0.01
    assert all(abs(v - 0.5) < 4 * sigma + 0.02 for v in poisson)
    # a regular lattice: every nearest neighbour at the spacing, far beyond Poisson's
    gx, gy = np.meshgrid(np.arange(25) * 2 + 1, np.arange(10) * 2 + 1)
    lattice = K.iorg_points(np.stack([gx.ravel(), gy.ravel()], -1).astype(float), w, h,
                            periodic=True)
    assert lattice < 0.1
    # a Thomas process: 20 parents, 20 children each at 0.3 units
    parents = rng.uniform([0, 0], [w, h], (20, 2))
    kids = (parents[:, None, :] + rng.normal(0, 0.3, (20, 20, 2))).reshape(-1, 2)
    clustered = K.iorg_points(kids, w, h, periodic=True)
    assert clustered > 0.9
    # without wrapping, edge points see farther neighbours: Iorg is biased low
    assert K.iorg_points(rng.uniform([0, 0], [w, h], (n, 2)), w, h) < 0.5 + 2 * sigma


def test_iorg_units_do_not_matter() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 1, (200, 2)) * [30.0, 10.0]
    a = K.iorg_points(xy, 30.0, 10.0, periodic=True)
    b = K.iorg_points(xy * 1000.0, 30000.0, 10000.0, periodic=True)
    assert a == pytest.approx(b, rel=1e-12)


def test_iorg_of_masks_orders_regular_random_clustered() -> None:
    dx, dy = 2.0, 3.0
    ny, nx = 300, 450
    regular = _rects((ny, nx), dx, dy, [(x, y, 4, 6) for x in np.arange(0, nx * dx, 30)
                                        for y in np.arange(0, ny * dy, 30)])
    rng = np.random.default_rng(5)
    centres = rng.uniform([0, 0], [nx * dx, ny * dy], (15, 2))
    blobs = [(cx + ox, cy + oy, 4, 6) for cx, cy in centres
             for ox, oy in rng.normal(0, 12, (8, 2))]
    clustered = _rects((ny, nx), dx, dy, blobs)
    assert K.iorg(regular, dx, dy) < 0.2
    assert K.iorg(clustered, dx, dy) > 0.7


# --- objects of known shape -----------------------------------------------------------


def test_rectangles_counts_lengths_perimeters_fraction() -> None:
    dx, dy = 0.5, 2.0
    m = np.zeros((40, 60), bool)
    m[2:6, 3:13] = True       # 4 x 10 px: 5 km x 8 km
    m[20:30, 30:32] = True    # 10 x 2 px: 1 km x 20 km
    m[35, 50] = True          # one pixel
    lab, n = K.label_objects(m)
    assert n == 3
    areas = K.object_areas(lab, n, dx, dy)
    assert sorted(areas) == [1.0, 20.0, 40.0]
    # 2 (w + h): 2 (0.5 + 2), 2 (5 + 8), 2 (1 + 20)
    assert sorted(K.object_perimeters(lab, n, dx, dy)) == [5.0, 26.0, 42.0]
    assert K.mean_perimeter(m, dx, dy) == pytest.approx((5.0 + 26.0 + 42.0) / 3)
    assert K.cloud_fraction(m) == pytest.approx((40 + 20 + 1) / 2400)
    assert K.mean_length(m, dx, dy) == pytest.approx((1 + np.sqrt(20) + np.sqrt(40)) / 3)
    assert K.max_length(m, dx, dy) == pytest.approx(np.sqrt(40))
    assert K.object_count(m) == 3


def test_connectivity_four_and_eight() -> None:
    m = np.eye(6, dtype=bool)
    assert K.object_count(m, 4) == 6
    assert K.object_count(m, 8) == 1
    with pytest.raises(ValueError, match="connectivity"):
        K.object_count(m, 6)  # type: ignore[arg-type]


def test_hole_counts_in_perimeter() -> None:
    m = np.ones((5, 5), bool)
    m[2, 2] = False
    lab, n = K.label_objects(m)
    assert K.object_perimeters(lab, n, 1.0, 1.0).tolist() == [20.0 + 4.0]


def test_discs_area_and_cop() -> None:
    dx = dy = 0.1
    r = 2.0
    m = _discs((200, 400), dx, dy, [(5.0, 10.0, r), (25.0, 10.0, r)])
    lab, n = K.label_objects(m)
    assert n == 2
    assert K.object_areas(lab, n, dx, dy) == pytest.approx([np.pi * r**2] * 2, rel=0.01)
    assert K.mean_length(m, dx, dy) == pytest.approx(np.sqrt(np.pi) * r, rel=0.01)
    # two equal discs 20 apart: (r + r) / 20
    assert K.cop(m, dx, dy) == pytest.approx(2 * r / 20.0, rel=0.01)
    assert np.isnan(K.cop(m[:, :200], dx, dy))


def test_scai_one_object_zero_none_nan_and_spread() -> None:
    m = np.zeros((50, 50), bool)
    assert np.isnan(K.scai(m, 1.0, 1.0))
    m[5:8, 5:8] = True
    assert K.scai(m, 1.0, 1.0) == 0.0
    near = m.copy()
    near[5:8, 12:15] = True
    far = m.copy()
    far[40:43, 40:43] = True
    assert K.scai(far, 1.0, 1.0) > K.scai(near, 1.0, 1.0)
    # Tobin: N / (cells / 2) * D0 / L * 1000 by hand
    d = np.hypot(35, 35)
    assert K.scai(far, 1.0, 1.0) == pytest.approx(2 / 1250 * d / 50 * 1000)


def test_size_exponent_recovers_power_law_and_needs_objects() -> None:
    rng = np.random.default_rng(7)
    alpha, xmin = 2.2, 6.0
    lengths = np.floor(xmin * (1 - rng.uniform(size=600)) ** (-1 / (alpha - 1))).astype(int)
    lengths = np.minimum(lengths, 1500)
    width = 2000
    rows: list[list[int]] = [[]]
    used = 0
    for n in lengths:  # one-pixel-high bars, packed in every other row
        if used + n + 1 > width:
            rows.append([])
            used = 0
        rows[-1].append(n)
        used += n + 1
    m = np.zeros((2 * len(rows), width), bool)
    for r, bars in enumerate(rows):
        c = 0
        for n in bars:
            m[2 * r, c:c + n] = True
            c += n + 1
    assert K.object_count(m) == 600
    est = K.size_exponent(m, 2.0, 3.0)
    assert est == pytest.approx(alpha, abs=0.2)
    # the unit of area does not change the exponent
    assert K.size_exponent(m, 20.0, 30.0) == pytest.approx(est, rel=1e-9)
    few = m[:2, :300]
    assert 2 < K.object_count(few) < 50
    assert np.isnan(K.size_exponent(few, 2.0, 3.0, min_objects=50))


def test_spectral_length_non_square_tiles_and_pixels() -> None:
    ny, nx, dx, dy = 48, 20, 3.0, 0.5
    y = (np.arange(ny) + 0.5) * dy
    f = np.cos(2 * np.pi * y / 8.0)[:, None].repeat(nx, 1)  # wavelength 8 along y
    assert K.spectral_length(f, dx, dy) == pytest.approx(8.0)
    x = (np.arange(nx) + 0.5) * dx
    g = np.cos(2 * np.pi * x / 12.0)[None, :].repeat(ny, 0)  # wavelength 12 along x
    assert K.spectral_length(g, dx, dy) == pytest.approx(12.0)
    assert np.isnan(K.spectral_length(np.ones((4, 6)), 1.0, 1.0))
    # moment order 2: (m_2 / m_0) ** (1 / 2), not (m_2 / m_0) / 2 (cloudmetrics' bug)
    both = f + g
    k2 = np.sqrt((1 / 8.0**2 + 1 / 12.0**2) / 2)
    assert K.spectral_length(both, dx, dy, order=2) == pytest.approx(1 / k2)


def test_open_sky_and_orientation() -> None:
    m = np.zeros((10, 20), bool)
    assert K.open_sky(m, 1.0, 1.0) == (1.0, 1.0)
    assert all(np.isnan(K.open_sky(~m, 1.0, 1.0)))
    m[:, 5] = True  # a wall: 5 x 10 of 200 to its west, 14 x 10 to its east
    mean, mx = K.open_sky(m, 2.0, 3.0)
    assert mx == pytest.approx(140 / 200)
    assert mean == pytest.approx((50 * 0.25 + 140 * 0.7) / 190)
    assert K.orientation(m, 1.0, 1.0) == 1.0
    assert K.orientation_angle(m, 1.0, 1.0) == pytest.approx(90.0)
    disc = _discs((101, 101), 1.0, 1.0, [(50.5, 50.5, 30.0)])
    assert K.orientation(disc, 1.0, 1.0) < 0.05
    # a disc on a grid of 1 x 2 pixels is still a disc in physical units
    disc2 = _discs((202, 101), 1.0, 0.5, [(50.5, 50.5, 30.0)])
    assert K.orientation(disc2, 1.0, 0.5) < 0.15
    assert K.orientation(disc2, 1.0, 1.0) > 0.8  # in pixel units it is an ellipse
    # moments use physical coordinates: a diagonal of square pixels is 45 deg, but
    # 60 deg when rows are sqrt(3) apart
    assert K.orientation_angle(np.eye(30, dtype=bool), 1.0, np.sqrt(3)) == pytest.approx(60)


def test_fractal_dimension_smooth_shapes_near_one() -> None:
    sizes = [2, 3, 4, 6, 8, 11, 15, 20]
    m = np.zeros((40, 200), bool)
    c = 0
    for s in sizes:
        m[1:1 + s, c:c + s] = True
        c += s + 2
    assert K.fractal_dimension(m, 1.0, 1.0) == pytest.approx(1.0, abs=1e-9)
    assert np.isnan(K.fractal_dimension(m[:, :10], 1.0, 1.0))


# --- invariance to resolution and domain size ------------------------------------------

_SCENE = [(12.0, 9.0, 3.0), (40.0, 30.0, 5.0), (70.0, 12.0, 2.5), (55.0, 50.0, 4.0),
          (20.0, 45.0, 6.0), (85.0, 40.0, 3.5)]


@pytest.mark.parametrize("metric,rtol", [
    ("cloud_fraction", 0.02), ("object_count", 0.0), ("mean_length", 0.02),
    ("max_length", 0.02), ("cop", 0.03), ("scai", 0.05), ("iorg", 0.03),
    ("spectral_length", 0.05), ("open_sky", 0.05), ("orientation", 0.1)])
def test_same_physical_scene_at_two_resolutions(metric: str, rtol: float) -> None:
    w, h = 100.0, 60.0  # km
    coarse = _discs((120, 200), w / 200, h / 120, _SCENE)  # 0.5 km
    fine = _discs((480, 800), w / 800, h / 480, _SCENE)    # 0.125 km
    a = K.tile_metrics(coarse, w / 200, h / 120, [metric])[0]
    b = K.tile_metrics(fine, w / 800, h / 480, [metric])[0]
    if metric == "scai":  # Tobin's N_max counts cells: fix the cell to compare
        a = K.scai(coarse, w / 200, h / 120, cell_area=1.0)
        b = K.scai(fine, w / 800, h / 480, cell_area=1.0)
    assert a == pytest.approx(b, rel=rtol)


def test_spectral_moment_of_positive_order_depends_on_resolution() -> None:
    w, h = 100.0, 60.0
    coarse = _discs((120, 200), w / 200, h / 120, _SCENE)
    fine = _discs((480, 800), w / 800, h / 480, _SCENE)
    a = K.spectral_length(coarse, w / 200, h / 120, order=1)
    b = K.spectral_length(fine, w / 800, h / 480, order=1)
    assert a / b > 1.2  # why order=-1 is the default


def test_rectangles_perimeter_same_at_two_resolutions() -> None:
    rects = [(2.0, 4.0, 10.0, 6.0), (30.0, 20.0, 4.0, 12.0)]
    a = K.mean_perimeter(_rects((40, 50), 1.0, 1.0, rects), 1.0, 1.0)
    b = K.mean_perimeter(_rects((160, 100), 0.5, 0.25, rects), 0.5, 0.25)
    assert a == pytest.approx(b) == pytest.approx((32 + 32) / 2)


@pytest.mark.parametrize("metric", ["cloud_fraction", "mean_length", "max_length",
                                    "mean_perimeter", "spectral_length"])
def test_same_pattern_on_a_larger_domain(metric: str) -> None:
    one = _discs((120, 200), 0.5, 0.5, _SCENE)
    four = np.tile(one, (2, 2))  # the pattern repeated on a 2 x 2 larger domain
    a = K.tile_metrics(one, 0.5, 0.5, [metric])[0]
    b = K.tile_metrics(four, 0.5, 0.5, [metric])[0]
    assert a == pytest.approx(b, rel=1e-9)
    assert K.object_count(four) == 4 * K.object_count(one)


def test_tile_metrics_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        K.tile_metrics(np.zeros((4, 4), bool), 1.0, 1.0, ["iorgg"])


# --- the cube operator ----------------------------------------------------------------

_OPS_METRICS = ["cloud_fraction", "object_count", "mean_length", "mean_perimeter", "cop",
                "iorg", "open_sky", "spectral_length", "orientation"]


def _projected_cube(seed: int = 0, nt: int = 3, ny: int = 36, nx: int = 50) -> xr.DataArray:
    """Smoothed noise on a projected grid of 2 km x 1 km pixels, with a 2-D lat coord."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.normal(size=(nt, ny, nx)), (0, 1.5, 1.5), mode="wrap")
    y = np.arange(ny) * 2000.0
    x = np.arange(nx) * 1000.0
    lat = 50.0 + (y[:, None] + 0 * x[None, :]) / 111e3
    return xr.DataArray(v, dims=("time", "y", "x"), name="bt",
                        coords={"time": np.arange(nt), "y": ("y", y, {"units": "m"}),
                                "x": ("x", x, {"units": "m"}), "lat": (("y", "x"), lat)})


def _loop(da: xr.DataArray, ty: int, tx: int, thr: float, metrics: list[str]) -> np.ndarray:
    v = da.values
    nt, ny, nx = v.shape
    out = np.empty((len(metrics), nt, ny // ty, nx // tx))
    for t in range(nt):
        for i in range(ny // ty):
            for j in range(nx // tx):
                tile = v[t, i * ty:(i + 1) * ty, j * tx:(j + 1) * tx] > thr
                out[:, t, i, j] = K.tile_metrics(tile, 1.0, 2.0, metrics)
    return out


def test_operator_equals_a_per_tile_loop_and_is_lazy() -> None:
    da = _projected_cube().chunk({"time": 1, "y": 18, "x": 25})
    with raise_if_dask_computes():
        out = organisation_metrics(da, threshold=0.3, tile={"lat": 12, "lon": 10},
                                   metrics=_OPS_METRICS)
    assert out.cloud_fraction.dims == ("time", "tile_y", "tile_x")
    assert out.sizes == {"time": 3, "tile_y": 3, "tile_x": 5}
    assert out.cloud_fraction.chunks is not None
    ref = _loop(_projected_cube(), 12, 10, 0.3, _OPS_METRICS)
    for k, name in enumerate(_OPS_METRICS):
        np.testing.assert_allclose(out[name].values, ref[k], equal_nan=True, err_msg=name)
    assert out.mean_length.attrs["units"] == "km"
    assert out.y.values.tolist() == [11000.0, 35000.0, 59000.0]
    assert out.lat.dims == ("tile_y", "tile_x")
    assert float(out.tile_dy) == 2.0 and out.tile_dx.values.tolist() == [1.0] * 3
    assert out.attrs["engine_tile_km"] == [24.0, 10.0]


@settings(max_examples=8, deadline=None)
@given(cy=st.integers(1, 36), cx=st.integers(1, 50), ct=st.integers(1, 3))
def test_operator_does_not_depend_on_chunking(cy: int, cx: int, ct: int) -> None:
    base = organisation_metrics(_projected_cube(), threshold=0.2, tile={"y": 9, "x": 16},
                                metrics=_OPS_METRICS).compute()
    other = organisation_metrics(_projected_cube().chunk({"time": ct, "y": cy, "x": cx}),
                                 threshold=0.2, tile={"y": 9, "x": 16},
                                 metrics=_OPS_METRICS).compute(scheduler="synchronous")
    xr.testing.assert_allclose(base, other)
    assert base.attrs["engine_tiles_trimmed"] == "0 rows, 2 columns"


def test_operator_tiles_in_km_below_and_missing_values() -> None:
    da = _projected_cube()
    cold = organisation_metrics(da, threshold=-0.3, above=False,
                                tile={"y": "24km", "x": "10000m"}, metrics=["cloud_fraction"])
    assert cold.attrs["engine_tile_pixels"] == [12, 10]
    assert cold.cloud_fraction.values[0, 0, 0] == pytest.approx(
        float((da.values[0, :12, :10] < -0.3).mean()))
    holed = da.copy()
    holed.values[1, 0, 0] = np.nan
    out = organisation_metrics(holed, threshold=0.3, tile={"y": 12, "x": 10},
                               metrics=["cloud_fraction"])
    assert np.isnan(out.cloud_fraction.values[1, 0, 0])
    assert np.isfinite(out.cloud_fraction.values[1, 0, 1])
    assert np.isfinite(out.cloud_fraction.values[0, 0, 0])


def test_operator_on_latitude_longitude_uses_cos_latitude() -> None:
    lat = np.arange(0.0, 80.0, 1.0)
    lon = np.arange(0.0, 20.0, 1.0)
    v = np.zeros((lat.size, lon.size))
    v[5, 5] = v[65, 5] = 1.0  # one pixel near the equator, one at 65 N
    da = xr.DataArray(v, dims=("lat", "lon"), coords={
        "lat": ("lat", lat, {"units": "degrees_north"}),
        "lon": ("lon", lon, {"units": "degrees_east"})})
    out = organisation_metrics(da, threshold=0.5, tile={"lat": 10, "lon": 20},
                               metrics=["mean_perimeter", "mean_length"])
    r = 6371.0088 * np.pi / 180
    for i in (0, 6):
        dx = r * np.cos(np.radians(lat[i * 10:(i + 1) * 10])).mean()
        assert float(out.tile_dx[i]) == pytest.approx(dx)
        assert float(out.mean_perimeter[i, 0]) == pytest.approx(2 * (dx + r))
        assert float(out.mean_length[i, 0]) == pytest.approx(np.sqrt(dx * r))
    assert out.mean_perimeter.dims == ("tile_y", "tile_x")
    assert out.lat.values[:2].tolist() == [4.5, 14.5]


@pytest.mark.parametrize("call,err,match", [
    (lambda ds: organisation_metrics(ds, "cth", threshold=1, tile={"y": 4, "x": 4}),
     CubeError, "variable 'cth' is not in the cube"),
    (lambda ds: organisation_metrics(ds, "bt", threshold=1, tile={"y": 40, "x": 4}),
     SpecError, "larger than the cube"),
    (lambda ds: organisation_metrics(ds, "bt", threshold=1, tile={"y": 4, "x": 4},
                                     metrics=["iorg", "lorg"]), SpecError, "unknown metrics"),
    (lambda ds: organisation_metrics(ds, "bt", threshold=1, tile={"y": 4}),
     SpecError, "both horizontal dims"),
    (lambda ds: organisation_metrics(ds, "bt", threshold=1, tile={"y": 4, "x": "far"}),
     SpecError, "give pixels"),
    (lambda ds: organisation_metrics(ds.assign_coords(x=ds.x.assign_attrs(units="furlong")),
                                     "bt", threshold=1, tile={"y": 4, "x": 4}),
     CubeError, "give dx and dy"),
])
def test_operator_bad_input_is_one_line(call, err, match) -> None:  # type: ignore[no-untyped-def]
    ds = _projected_cube().to_dataset()
    with pytest.raises(err, match=match) as info:
        call(ds)
    assert "\n" not in str(info.value)


def test_msg_store_is_the_converted_sample(tmp_path) -> None:
    """catalogs/data/msg_ir.zarr is what convert_msg_sample makes from iris-sample-data."""
    from engine.io.archive_sample import sample_dir
    from engine.pipelines.cloud_metrics import MSG_FILE, convert_msg_sample

    fresh = xr.open_zarr(convert_msg_sample(str(tmp_path / "msg.zarr")))
    shipped = xr.open_zarr(os.path.join(ROOT, "catalogs", "data", "msg_ir.zarr"))
    xr.testing.assert_identical(fresh.drop_attrs(), shipped.drop_attrs())
    with xr.open_dataset(os.path.join(sample_dir(), MSG_FILE)) as raw:
        np.testing.assert_array_equal(shipped.bt.values[0], raw["data"].values)


# --- the shipped job ------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_FILE = os.path.join(ROOT, "jobs", "cloud-metrics.yaml")


def test_shipped_cloud_metrics_job_writes_the_kernels_values(tmp_path, run_cli) -> None:
    """jobs/cloud-metrics.yaml end to end on the MSG image: every tile's metrics equal the
    kernels on the same pixels; tiles with missing pixels are NaN; a rerun writes nothing;
    a bad variable is one line at validate."""
    url = str(tmp_path / "metrics.zarr")
    args = ["--set", f"output.url={url}"]
    code, out, err = run_cli(["run", JOB_FILE, "--cluster", "threads", "--quiet", *args])
    assert code == 0, err
    written = xr.open_zarr(url)
    assert written.sizes == {"time": 1, "tile_y": 8, "tile_x": 8}
    assert written.attrs["engine_job_kind"] == "cloud-metrics"
    assert written.lat.dims == ("tile_y", "tile_x") and written.iorg.attrs["units"] == "1"
    src = xr.open_zarr(os.path.join(ROOT, "catalogs", "data", "msg_ir.zarr"))
    bt = src["bt"].values[0]
    dx = float(np.median(np.abs(np.diff(src.x.values)))) / 1000
    dy = float(np.median(np.abs(np.diff(src.y.values)))) / 1000
    names = list(K.METRICS)
    finite = 0
    for i in range(8):
        for j in range(8):
            tile = bt[i * 20:(i + 1) * 20, j * 32:(j + 1) * 32]
            got = np.array([float(written[m][0, i, j]) for m in names])
            if np.isnan(tile).any():
                assert np.isnan(got).all()
                continue
            finite += 1
            np.testing.assert_allclose(got, K.tile_metrics(tile < 260.0, dx, dy, names),
                                       rtol=1e-6, equal_nan=True, err_msg=f"tile {i},{j}")
    assert finite == 56
    m = json.loads((tmp_path / "metrics.run" / "metrics.json").read_text())
    assert m["metrics"]["cloud_fraction"]["n_finite"] == 56
    assert m["metrics"]["iorg"]["mean"] == pytest.approx(
        float(np.nanmean(written["iorg"].values)))
    assert (tmp_path / "metrics.run" / "metrics.png").stat().st_size > 0

    code, out, err = run_cli(["run", JOB_FILE, "--cluster", "threads", "--quiet", *args])
    assert code == 0, err
    assert "nothing new to compute" in " ".join(out.split())

    code, out, err = run_cli(["validate", JOB_FILE, *args, "--set", "mask.variable=tb"])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "tb" in lines[0], err
