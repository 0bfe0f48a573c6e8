"""engine.ml.gradcam: Grad-CAM / Grad-CAM++ localisation, batching, cube helper, overlay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from engine.errors import SpecError
from engine.ml.gradcam import (
    cube_gradcam,
    find_layer,
    gradcam,
    overlay_plot,
    resolving_layer,
)
from engine.testing.checks import raise_if_dask_computes

SIZE = 16
LAYER = "act"  # the ReLU after the stripe detectors (post-activation maps)


class QuadrantNet(nn.Module):
    """Stripe detectors (horizontal, vertical) whose class reads only the top-left
    quadrant of the feature map: class 0 = horizontal stripes there, 1 = vertical."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        k = torch.tensor([[-1.0, -1.0, -1.0], [2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]]) / 3
        with torch.no_grad():
            self.conv.weight[:] = torch.stack([k, k.T])[:, None]
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight[:] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        h, w = a.shape[-2:]
        return self.fc(a[:, :, : h // 2, : w // 2].mean((2, 3)))


def _stripes(vertical: bool) -> np.ndarray:
    s = np.zeros((SIZE, SIZE), np.float32)
    if vertical:
        s[:, ::2] = 1.0
    else:
        s[::2, :] = 1.0
    return s


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Class stripes in the top-left quadrant; the other quadrants get noise and, as a
    distractor, stripes of the *other* orientation in the bottom-right one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0.0, 0.02, size=(n, 1, SIZE, SIZE)).astype(np.float32)
    h = SIZE // 2
    for i, c in enumerate(y):
        x[i, 0, :h, :h] += _stripes(bool(c))[:h, :h]
        x[i, 0, h:, h:] += _stripes(not c)[h:, h:]
    return torch.from_numpy(x), y


def _top_left_share(maps: np.ndarray) -> np.ndarray:
    h = SIZE // 2
    return maps[:, :h, :h].sum((1, 2)) / maps.sum((1, 2))


def test_model_depends_only_on_the_quadrant():
    net = QuadrantNet()
    x, y = _images(8)
    logits = net(x)
    assert (logits.argmax(1).numpy() == y).all()
    changed = x.clone()
    changed[:, :, SIZE // 2 + 1 :, :] = torch.randn_like(changed[:, :, SIZE // 2 + 1 :, :])
    changed[:, :, :, SIZE // 2 + 1 :] = 3.0
    torch.testing.assert_close(net(changed), logits)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmap_mass_concentrates_in_the_quadrant(method):
    x, y = _images(12, seed=1)
    r = gradcam(QuadrantNet(), x, method=method, layer=LAYER)
    assert r.heatmaps.shape == (12, SIZE, SIZE) and r.heatmaps.dtype == np.float32
    np.testing.assert_array_equal(r.target, y)  # explains the predicted (= true) class
    np.testing.assert_array_equal(r.prediction, y)
    share = _top_left_share(r.heatmaps)
    # a quarter of the area holds > 75 % of the mass (uniform: 25 %; the pre-activation conv
    # output, where negative weight x negative activation lights the distractor: ~40 %)
    assert share.min() > 0.75, share
    assert np.allclose(r.heatmaps.max((1, 2)), 1.0) and r.heatmaps.min() >= 0.0
    # the distractor quadrant (other-orientation stripes) gets almost nothing away from its
    # edges (zero padding at the image border makes a stripe end look like an edge: 9 % of
    # the area, < 3 % of the mass)
    h = SIZE // 2
    inner = r.heatmaps[:, h + 1 : -1, h + 1 : -1].sum((1, 2)) / r.heatmaps.sum((1, 2))
    assert inner.max() < 0.03, inner


def test_explaining_the_wrong_class_does_not_highlight_the_quadrant():
    x, y = _images(6, seed=2)
    r = gradcam(QuadrantNet(), x, target=1 - y, normalize=False, layer=LAYER)
    right = gradcam(QuadrantNet(), x, normalize=False, layer=LAYER)
    h = SIZE // 2
    assert (r.heatmaps[:, :h, :h].sum((1, 2)) < 0.1 * right.heatmaps[:, :h, :h].sum((1, 2))).all()


def _small_resnet() -> nn.Module:
    from engine.ml.archs import resnet18

    torch.manual_seed(0)
    net = resnet18(3, 4, width=8, stem="small")
    # non-trivial batch-norm statistics so eval mode differs from train mode
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, 3, 32, 32) * 2)
    return net.eval()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_batch_equals_one_by_one_and_shapes(method):
    net = _small_resnet()
    x = torch.rand(7, 3, 32, 32)
    # last Conv2d by default: the 1x1-free conv2 of the last block, a 4x4 map of a 32 tile
    assert find_layer(net) is net.layers[-1].conv2
    batched = gradcam(net, x, method=method, batch_size=3)
    single = [gradcam(net, x[i : i + 1], method=method) for i in range(7)]
    assert batched.heatmaps.shape == (7, 32, 32)
    np.testing.assert_allclose(batched.heatmaps, np.concatenate([s.heatmaps for s in single]),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(batched.target, [s.target[0] for s in single])
    # an iterator of batches gives the same maps
    it = gradcam(net, iter([x[:2], x[2:]]), method=method)
    np.testing.assert_allclose(it.heatmaps, batched.heatmaps, rtol=1e-4, atol=1e-5)
    # the maps are not constant (the upsampled 4x4 map varies) and differ per tile
    assert batched.heatmaps.std((1, 2)).min() > 0
    assert not np.allclose(batched.heatmaps[0], batched.heatmaps[1])
    assert net.training is False


def test_named_layer_and_per_tile_targets():
    net = _small_resnet()
    x = torch.rand(4, 3, 32, 32)
    r = gradcam(net, x, layer="layers.5", target=[0, 1, 2, 3], normalize=False)
    np.testing.assert_array_equal(r.target, [0, 1, 2, 3])
    split = gradcam(net, x, layer="layers.5", target=[0, 1, 2, 3], normalize=False,
                    batch_size=3)  # the targets follow the tiles across batches
    np.testing.assert_array_equal(split.target, [0, 1, 2, 3])
    np.testing.assert_allclose(split.heatmaps, r.heatmaps, rtol=1e-4, atol=1e-6)
    other = gradcam(net, x, layer="layers.7", target=[0, 1, 2, 3], normalize=False)
    assert not np.allclose(r.heatmaps, other.heatmaps)
    with pytest.raises(SpecError, match="not in the model"):
        gradcam(net, x, layer="nope")
    with pytest.raises(SpecError, match="target classes"):
        gradcam(net, x, target=4)


def test_gradcam_plus_plus_differs_from_gradcam():
    net = _small_resnet()
    x = torch.rand(3, 3, 32, 32)
    a = gradcam(net, x, method="gradcam").heatmaps
    b = gradcam(net, x, method="gradcam++").heatmaps
    assert a.shape == b.shape and not np.allclose(a, b)


def test_cube_gradcam_matches_tiles_and_is_lazy():
    rng = np.random.default_rng(3)
    ny, nx = 3 * SIZE + 5, 2 * SIZE  # an incomplete row of tiles at the bottom
    field = rng.normal(0.0, 0.05, size=(2, ny, nx)).astype(np.float32)
    classes = rng.integers(0, 2, (2, 3, 2))
    for t in range(2):
        for i in range(3):
            for j in range(2):
                field[t, i * SIZE : (i + 1) * SIZE, j * SIZE : (j + 1) * SIZE] += _stripes(
                    bool(classes[t, i, j]))
    da = xr.DataArray(field, dims=("time", "y", "x"),
                      coords={"time": [0, 1], "y": np.arange(ny), "x": np.arange(nx)}
                      ).chunk({"time": 1, "y": 20, "x": 20})
    with raise_if_dask_computes():
        ds = cube_gradcam(QuadrantNet(), da, {"y": SIZE, "x": SIZE}, layer=LAYER)
    assert set(ds.data_vars) == {"cam", "prediction", "probability"}
    assert ds.cam.dims == ("time", "y", "x") and ds.cam.shape == (2, ny, nx)
    graph = dict(ds.cam.data.__dask_graph__())
    models = [k for k, v in graph.items() if isinstance(v, nn.Module)
              or isinstance(getattr(v, "value", None), nn.Module)]
    assert len(models) == 1  # the model is one key, not a copy per block
    ds = ds.compute()
    tiles = [field[t, i * SIZE : (i + 1) * SIZE, j * SIZE : (j + 1) * SIZE]
             for t in range(2) for i in range(3) for j in range(2)]
    ref = gradcam(QuadrantNet(), torch.from_numpy(np.stack(tiles)[:, None]), layer=LAYER)
    k = 0
    for t in range(2):
        for i in range(3):
            for j in range(2):
                sl = dict(time=t, y=slice(i * SIZE, (i + 1) * SIZE),
                          x=slice(j * SIZE, (j + 1) * SIZE))
                np.testing.assert_allclose(ds.cam.isel(sl).values, ref.heatmaps[k],
                                           rtol=1e-5, atol=1e-6)
                assert (ds.prediction.isel(sl).values == classes[t, i, j]).all()
                k += 1
    assert np.isnan(ds.cam.values[:, 3 * SIZE :]).all()
    assert np.isnan(ds.prediction.values[:, 3 * SIZE :]).all()
    p = ds.probability.values[:, : 3 * SIZE]
    assert ((p > 0.5) & (p <= 1.0)).all()  # explains the predicted class


def test_cube_gradcam_with_channels():
    net = _small_resnet()
    rng = np.random.default_rng(0)
    data = xr.DataArray(rng.random((3, 64, 32)).astype(np.float32), dims=("band", "y", "x"))
    ds = cube_gradcam(net, data, {"y": 32, "x": 32}, channel_dim="band", method="gradcam++")
    assert ds.cam.dims == ("y", "x") and ds.cam.shape == (64, 32)
    top = gradcam(net, torch.from_numpy(data.values[None, :, :32, :]), method="gradcam++")
    np.testing.assert_allclose(ds.cam.values[:32], top.heatmaps[0], rtol=1e-4, atol=1e-5)


def test_overlay_plot(tmp_path):
    x, _ = _images(1)
    r = gradcam(QuadrantNet(), x, layer=LAYER)
    fig = overlay_plot(x[0].numpy(), r.heatmaps[0], title="class 0", path=tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 0
    assert len(fig.axes[0].images) == 2 and fig.axes[0].get_title() == "class 0"


class LinearHead(nn.Module):
    """A conv layer then a linear map of its flattened output: the gradient of logit ``c``
    with respect to the conv output is exactly ``weight[c]`` (with negative entries)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.conv(x), 1))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_maps_equal_the_published_formulas(method):
    net = LinearHead()
    x = torch.rand(3, 2, 4, 4)
    r = gradcam(net, x, target=[1, 0, 1], method=method, normalize=False)
    with torch.no_grad():
        acts = net.conv(x).numpy().astype(np.float64)  # (3, 3, 4, 4)
    w = net.head.weight.detach().numpy().reshape(2, 3, 4, 4).astype(np.float64)
    for i, c in enumerate([1, 0, 1]):
        a, g = acts[i], w[c]
        if method == "gradcam":
            weights = g.mean(axis=(1, 2))
        else:  # Chattopadhay et al. 2018, eq. 19 with the exponential score
            denom = 2 * g**2 + a.sum(axis=(1, 2))[:, None, None] * g**3
            alpha = np.where(denom != 0, g**2 / np.where(denom != 0, denom, 1), 0)
            weights = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
        expected = np.maximum((weights[:, None, None] * a).sum(0), 0)
        # the map is already tile-sized (no stride): upsampling is the identity
        np.testing.assert_allclose(r.heatmaps[i], expected, rtol=1e-4, atol=1e-6)
    assert (r.heatmaps > 0).any()


def test_cube_gradcam_keys_are_tokens_of_data_model_and_parameters():
    """A repeated call has the same keys (a resumed write recognises its data); another
    model content, method or chunking has others."""
    net = _small_resnet()
    data = xr.DataArray(np.random.default_rng(1).random((3, 64, 64)).astype(np.float32),
                        dims=("band", "y", "x")).chunk({"y": 32})
    tile = {"y": 32, "x": 32}

    def name(model=net, d=data, **kw):
        return cube_gradcam(model, d, tile, channel_dim="band", **kw).cam.data.name

    assert name() == name()
    other = _small_resnet()
    with torch.no_grad():
        other.fc.bias += 1.0
    assert len({name(), name(model=other), name(method="gradcam++"),
                name(d=data.chunk({"y": 64}))}) == 4


def test_resolving_layer_takes_the_deepest_stage_with_room_to_localise():
    net = _small_resnet()  # small stem: blocks 0-1 at full size, then halved per stage
    stages = [f"layers.{i}" for i in range(8)]
    assert resolving_layer(net, torch.zeros(1, 3, 16, 16), stages) == "layers.5"   # 4 x 4
    assert resolving_layer(net, torch.zeros(1, 3, 32, 32), stages) == "layers.7"   # 4 x 4
    assert resolving_layer(net, torch.zeros(1, 3, 8, 8), stages) == "layers.3"
    assert resolving_layer(net, torch.zeros(1, 3, 2, 2), stages) == "layers.0"  # none: first
    assert net.training is False
