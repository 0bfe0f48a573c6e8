"""predict: halo blending, chunking invariance, pointwise path, model shipping and loading."""

from __future__ import annotations

import io
import warnings

import cloudpickle
import dask
import numpy as np
import pytest
import torch
from torch import nn

from engine.errors import CubeError, SpecError
from engine.kernels.windows import grid_padding
from engine.ml.predict import ModelSpec, model_load_count, predict, serialize_model
from engine.ml.registry import build_architecture, register_architecture
from engine.testing.cubes import synthetic_cube

SHAPE = {"time": 2, "lat": 90, "lon": 70}
TILE = {"lat": 32, "lon": 32}


class _NoCompute:
    def __call__(self, dsk, keys, **kwargs):
        raise AssertionError("dask computed while building the graph")


def _identity_conv(channel: int = 1) -> nn.Module:
    """3x3 conv that copies input channel ``channel``: exact even at tile borders."""
    conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, channel, 1, 1] = 1.0
    return conv


class _NanGuard(nn.Module):
    """Per-pixel linear model that refuses NaN input (NaN pixels must never reach it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            raise RuntimeError("NaN reached the model")
        return self.lin(x)


@pytest.fixture(scope="module")
def client():
    from engine.testing.clusters import process_client

    with process_client(2) as c:
        yield c


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_identity_model_reproduces_the_input(blend, overlap):
    ds = synthetic_cube(SHAPE, chunks={"lat": 40, "lon": 25})
    out = predict(ds, _identity_conv(), tile=TILE, overlap=overlap, blend=blend)
    assert out.dims == ("time", "lat", "lon") and out.shape == (2, 90, 70)
    np.testing.assert_allclose(out.values, ds["lst"].values, rtol=0, atol=1e-5)
    assert out.name == "prediction" and "engine_model_hash" in out.attrs
    xr_coords = out.coords
    np.testing.assert_array_equal(xr_coords["lat"].values, ds["lat"].values)


def test_output_does_not_depend_on_chunking():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ELU(), nn.Conv2d(8, 2, 3, padding=1))
    results = []
    for chunks in ({"time": 1}, {"lat": 33, "lon": 17}, {"time": 2, "lat": 90, "lon": 70}):
        ds = synthetic_cube(SHAPE, chunks=chunks)
        out = predict(ds, net, tile=TILE, overlap=0.5, out_channels=2, batch_size=5)
        assert out.dims == ("time", "channel", "lat", "lon")
        v = out.values
        assert not np.isnan(v).any()
        results.append(v)
    for v in results[1:]:
        np.testing.assert_allclose(v, results[0], rtol=0, atol=1e-5)


def test_tile_larger_than_the_array_and_odd_sizes():
    ds = synthetic_cube({"time": 1, "lat": 20, "lon": 7}, chunks={})
    for boundary in ("reflect", "nearest", 0.0):
        out = predict(ds, _identity_conv(), tile={"lat": 32, "lon": 16}, overlap=0.75,
                      boundary=boundary)
        np.testing.assert_allclose(out.values, ds["lst"].values, rtol=0, atol=1e-5)


def test_dataarray_with_a_channel_dim():
    ds = synthetic_cube(SHAPE, chunks={"lat": 45})
    arr = ds.to_dataarray("band").transpose("time", "lat", "lon", "band")
    out = predict(arr, _identity_conv(2), tile=TILE)
    np.testing.assert_allclose(out.values, ds["ndvi"].values, rtol=0, atol=1e-5)


def test_predict_is_lazy():
    ds = synthetic_cube(SHAPE, chunks={"lat": 40})
    with dask.config.set(scheduler=_NoCompute()):
        out = predict(ds, _identity_conv(), tile=TILE)
        point = predict(ds, nn.Linear(3, 1), tile=None)
    assert out.chunks is not None and point.chunks is not None


def test_pointwise_matches_the_model_and_keeps_nan():
    ds = synthetic_cube(SHAPE, chunks={"lat": 33, "lon": 40}, nan_fraction=0.05)
    model = _NanGuard()
    out = predict(ds, model, tile=None, batch_size=1000)
    assert out.dims == ("time", "lat", "lon")
    x = np.stack([ds[v].values for v in ds.data_vars], axis=-1)
    with torch.no_grad():
        ref = model.lin(torch.from_numpy(x.reshape(-1, 3))).numpy().reshape(out.shape)
    v = out.values
    np.testing.assert_array_equal(np.isnan(v), np.isnan(x).any(axis=-1))
    np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-6)
    filled = predict(ds, model, tile=None, fill_value=0.0).values
    assert not np.isnan(filled).any()


def test_pointwise_multi_output_adds_a_channel_dim():
    ds = synthetic_cube(SHAPE, chunks={"lat": 45})
    out = predict(ds, nn.Linear(3, 4), tile={}, out_channels=4)
    assert out.dims == ("time", "lat", "lon", "channel") and out.shape[-1] == 4


def test_model_loaded_once_per_worker_process(client):
    ds = synthetic_cube({"time": 6, "lat": 64, "lon": 64}, chunks={"time": 1, "lat": 32})
    net = build_architecture("conv_net", in_channels=3, hidden=8, layers=2)
    out = predict(ds, net, tile=TILE)
    assert out.data.npartitions >= 12
    before = client.run(model_load_count)
    v = out.compute()
    loads = client.run(model_load_count)
    assert all(loads[w] - before[w] <= 1 for w in loads) and sum(loads.values()) >= 1
    local = predict(ds, net, tile=TILE).compute(scheduler="threads")
    np.testing.assert_allclose(v.values, local.values, rtol=0, atol=1e-5)


def test_torchscript_file_and_state_dict_inputs(tmp_path):
    torch.manual_seed(1)
    net = build_architecture("conv_net", in_channels=3, hidden=4, layers=1, kernel_size=3)
    ds = synthetic_cube({"time": 1, "lat": 64, "lon": 64}, chunks={"lat": 32})
    ref = predict(ds, net, tile=TILE).values

    ts = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(ts))
    # TorchScript is code: refused with one line unless the caller opts in
    with pytest.raises(SpecError, match="TorchScript, which is executable.*allow_torchscript"):
        predict(ds, str(ts), tile=TILE)
    with pytest.raises(SpecError, match="allow_torchscript"):
        serialize_model(str(ts))
    got = predict(ds, str(ts), tile=TILE, allow_torchscript=True)
    payload = serialize_model(str(ts), allow_torchscript=True)  # a payload from a file
    with pytest.raises(SpecError, match="allow_torchscript"):  # needs the opt-in again
        predict(ds, payload, tile=TILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)  # an object already in this process: no file read
    np.testing.assert_allclose(predict(ds, scripted, tile=TILE).values, ref, atol=1e-5)
    assert got.attrs["engine_model_format"] == "torchscript"
    np.testing.assert_allclose(got.values, ref, atol=1e-5)

    sd = tmp_path / "weights.pt"
    torch.save(net.state_dict(), sd)
    kwargs = {"in_channels": 3, "hidden": 4, "layers": 1, "kernel_size": 3}
    for model in (ModelSpec(str(sd), "conv_net", kwargs), (sd.read_bytes(), "conv_net", kwargs),
                  (net.state_dict(), "conv_net", kwargs)):
        np.testing.assert_allclose(predict(ds, model, tile=TILE).values, ref, atol=1e-5)
    assert serialize_model(ModelSpec(str(sd), "conv_net", kwargs)).kind == "state_dict"

    with pytest.raises(SpecError, match="not a TorchScript"):
        predict(ds, str(sd), tile=TILE)
    with pytest.raises(SpecError, match="do not load"):
        predict(ds, ModelSpec(str(sd), "conv_net", {"in_channels": 3, "hidden": 5}))
    with pytest.raises(SpecError, match="TorchScript archive, not a state_dict"):
        predict(ds, ModelSpec(str(ts), "conv_net", kwargs), tile=TILE)
    with pytest.raises(SpecError, match="not found"):
        predict(ds, str(tmp_path / "missing.pt"))


def test_custom_registered_architecture_and_unet():
    @register_architecture("test_double", overwrite=True)
    def double(in_channels: int) -> nn.Module:
        conv = nn.Conv2d(in_channels, 1, 1, bias=False)
        nn.init.constant_(conv.weight, 2.0 / in_channels)
        return conv

    ds = synthetic_cube({"time": 1, "lat": 64, "lon": 64}, chunks={"lat": 32})
    out = predict(ds, build_architecture("test_double", in_channels=3), tile=TILE).values
    want = 2.0 * sum(ds[v].values for v in ds.data_vars) / 3
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    unet = build_architecture("unet_small", in_channels=3, out_channels=2, base=4).eval()
    res = predict(ds, unet, tile=TILE, out_channels=2)
    assert res.shape == (1, 2, 64, 64) and np.isfinite(res.values).all()


def test_model_bytes_appear_once_in_the_graph():
    big = nn.Conv2d(3, 1, 1)
    big.register_buffer("ballast", torch.zeros(1_000_000))  # 4 MB of weights
    size = len(serialize_model(big).data)
    ds = synthetic_cube({"time": 8, "lat": 64, "lon": 64}, chunks={"time": 1, "lat": 32})
    for tile in (TILE, None):
        out = predict(ds, big, tile=tile)
        assert out.data.npartitions >= 16
        graph = dict(out.data.__dask_graph__())
        assert sum(k.startswith("model-") for k in map(str, graph)) == 1
        assert len(cloudpickle.dumps(graph)) < size + 2_000_000


def test_gpu_annotation_only_for_cuda():
    ds = synthetic_cube(SHAPE, chunks={"lat": 45})
    for device, want in (("cuda", {"GPU": 0.25}), ("cpu", None)):
        out = predict(ds, _identity_conv(), tile=TILE, device=device)
        layers = out.data.__dask_graph__().layers
        ann = [lay.annotations for name, lay in layers.items() if name.startswith("predict-")]
        assert ann and all((a or {}).get("resources") == want for a in ann)


def _net(seed: int, out: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ELU(), nn.Conv2d(4, out, 3, padding=1))


def _keys(arr) -> set:
    return set(map(str, dict(arr.data.__dask_graph__())))


@pytest.mark.parametrize("tile", [TILE, None])
def test_two_models_compose_in_one_graph(tile):
    ds = synthetic_cube(SHAPE, chunks={"lat": 40, "lon": 25})
    a_net, b_net = (_net(0), _net(1)) if tile else (nn.Linear(3, 1), nn.Linear(3, 1))
    a, b = predict(ds, a_net, tile=tile), predict(ds, b_net, tile=tile)
    va, vb = dask.compute(a, b)
    assert np.abs(va.values - vb.values).max() > 1e-3  # was exactly 0.0: shared keys
    np.testing.assert_array_equal(va.values, a.values)
    np.testing.assert_array_equal(vb.values, b.values)


def test_one_model_over_two_chunkings_in_one_graph():
    net = _net(2)
    a = predict(synthetic_cube(SHAPE, chunks={"lat": 40, "lon": 25}), net, tile=TILE)
    b = predict(synthetic_cube(SHAPE, chunks={"lat": 45, "lon": 70}), net, tile=TILE)
    va, vb = dask.compute(a, b)  # used to fail with "Missing dependency" or mix blocks
    assert a.chunks != b.chunks
    np.testing.assert_allclose(va.values, vb.values, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(va.values, a.values)


def test_keys_are_deterministic_and_name_every_input():
    ds = synthetic_cube(SHAPE, chunks={"lat": 40, "lon": 25})
    net = _net(3)
    base = {"tile": TILE, "overlap": 0.5, "blend": "gaussian", "boundary": "reflect",
            "precision": "auto", "device": "auto", "batch_size": 8, "out_channels": 1,
            "fill_value": None}
    first = predict(ds, net, **base)
    assert _keys(predict(ds, net, **base)) == _keys(first)  # same call, same keys
    variants = [{"tile": {"lat": 16, "lon": 32}}, {"overlap": 0.25}, {"blend": "mean"},
                {"boundary": "nearest"}, {"boundary": 0.0}, {"boundary": "constant"},
                {"precision": "bf16"}, {"device": "cpu"}, {"batch_size": 9},
                {"out_channels": 2}, {"fill_value": 0.0}]
    names = {first.data.name}
    for change in variants:
        out = predict(ds, net, **{**base, **change})
        names.add(out.data.name)
        mapped = [k for k in _keys(out) if "predict-tiles" in k]
        assert mapped and not set(mapped) & {k for k in _keys(first) if "predict-tiles" in k}
    other_model = predict(ds, _net(4), **base)
    other_chunks = predict(synthetic_cube(SHAPE, chunks={"lat": 45}), net, **base)
    other_data = predict(synthetic_cube(SHAPE, chunks={"lat": 40, "lon": 25}, seed=1), net,
                         **base)
    names |= {other_model.data.name, other_chunks.data.name, other_data.data.name}
    assert len(names) == len(variants) + 4
    pa = predict(ds, nn.Linear(3, 1), tile=None)
    pb = predict(ds, nn.Linear(3, 1), tile=None)
    assert pa.data.name != pb.data.name  # two random models
    assert predict(ds, pa_model := nn.Linear(3, 1), tile=None).data.name == \
        predict(ds, pa_model, tile=None).data.name


@pytest.mark.parametrize("chunks", [{"time": 1, "lat": 40, "lon": 25},
                                    {"time": 2, "lat": 33, "lon": 17}, {"lat": 89, "lon": 3}])
def test_prediction_has_the_input_chunking_and_merges_with_it(chunks):
    ds = synthetic_cube(SHAPE, chunks=chunks)
    for out_channels in (1, 2):
        out = predict(ds, _net(5, out_channels), tile=TILE, out_channels=out_channels)
        assert {d: out.chunksizes[d] for d in ds.dims} == dict(ds.chunksizes)
        merged = ds.assign(pred=out)  # one chunking per dim, or .chunks raises
        assert {d: merged.chunks[d] for d in ds.dims} == dict(ds.chunks)


def test_meter_counts_real_pixels_once_not_the_padding():
    from engine.meter import Meter

    ds = synthetic_cube({"time": 2, "lat": 50, "lon": 37}, chunks={"lat": 20, "lon": 16})
    m = Meter()
    with m.phase("p"):
        predict(ds, _identity_conv(), tile={"lat": 16, "lon": 16}, overlap=0.5).compute(
            scheduler="threads")  # in this process, whatever client an earlier test left
    tot = m.summary()["phases"]["p"]["total"]
    assert tot["output_pixels"] == 2 * 50 * 37  # each real pixel once: no halo, no padding


def test_bf16_autocast_on_cpu_stays_close_and_float32():
    ds = synthetic_cube({"time": 1, "lat": 64, "lon": 64}, chunks={"lat": 32})
    ref = predict(ds, _identity_conv(), tile=TILE).values
    out = predict(ds, _identity_conv(), tile=TILE, precision="bf16")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.values, ref, rtol=2e-2, atol=0.1)


def test_bad_arguments():
    ds = synthetic_cube(SHAPE, chunks={"lat": 45})
    with pytest.raises(CubeError, match="tile dims"):
        predict(ds, _identity_conv(), tile={"x": 8})
    with pytest.raises(SpecError, match="boundary"):
        predict(ds, _identity_conv(), boundary="wrap")
    with pytest.raises(SpecError, match="overlap"):
        predict(ds, _identity_conv(), overlap=1.0)
    with pytest.raises(SpecError, match="model of type"):
        predict(ds, object())
    with pytest.raises(CubeError, match="not in the cube"):
        predict(ds, _identity_conv(), variables=["nope"])
    for bs in (0, -1, 2.5, "8", True):  # a negative size once ran no model at all
        for tile in (TILE, None):
            with pytest.raises(SpecError, match="batch_size"):
                predict(ds, _identity_conv(), tile=tile, batch_size=bs)
    for tile in ({"lat": 8.7, "lon": 8}, {"lat": "8", "lon": 8}, ["lat", "lon"], (8, 8),
                 {"lat": 0, "lon": 8}):
        with pytest.raises(SpecError, match="whole number"):
            predict(ds, _identity_conv(), tile=tile)
    with pytest.raises(SpecError, match="out_channels"):
        predict(ds, _identity_conv(), out_channels=0)
    with pytest.raises(SpecError, match="channel_dim"):
        predict(ds, _identity_conv(), channel_dim="variable")
    yx = ds.rename({"lat": "y", "lon": "x"})
    with pytest.raises(CubeError, match="the default tile is"):
        predict(yx, _identity_conv())
    with pytest.raises(CubeError, match="length 0"):
        predict(ds.isel(lat=slice(0, 0)), _identity_conv(), tile=TILE)


def test_a_cube_with_a_channel_dim_and_several_outputs_is_refused_not_doubled():
    ds = synthetic_cube(SHAPE, chunks={"lat": 45}).expand_dims(channel=2)
    with pytest.raises(CubeError, match="has a dim 'channel' already"):
        predict(ds, _net(0, out=2), tile=TILE, out_channels=2)
    # a scalar coordinate of that name does not become the new dim's coordinate
    one = synthetic_cube(SHAPE, chunks={"lat": 45}).assign_coords(channel=7)
    out = predict(one, _net(0, out=2), tile=TILE, out_channels=2)
    assert out.sizes["channel"] == 2 and "channel" not in out.coords


def test_model_errors_say_what_the_model_was_given():
    class Dict(nn.Module):
        def forward(self, x):
            return {"out": x}

    ds = synthetic_cube({"time": 1, "lat": 32, "lon": 32}, chunks={})
    with pytest.raises(TypeError, match="returned a dict"):
        predict(ds, Dict(), tile=TILE).compute(scheduler="sync")
    wrong = nn.Conv2d(5, 1, 3, padding=1)  # the cube has 3 channels
    with pytest.raises(RuntimeError) as err:
        predict(ds, wrong, tile=TILE).compute(scheduler="sync")
    assert ", 3, 32, 32)" in " ".join(getattr(err.value, "__notes__", []))


def test_weights_changed_through_data_make_a_new_payload():
    """Writes through ``p.data`` (EMA updates) do not bump ``p``'s version counter: the
    payload cache looks at the weights' bytes."""
    from engine.ml.registry import build_architecture

    net = build_architecture("conv_net", in_channels=3, hidden=4, layers=2)
    first = serialize_model(net)
    next(net.parameters()).data.mul_(0.5)
    assert serialize_model(net).digest != first.digest
    ds = synthetic_cube({"time": 1, "lat": 32, "lon": 32}, chunks={})
    a = predict(ds, net, tile=TILE).values
    for p in net.parameters():
        p.data.copy_(torch.randn_like(p))
    assert not np.allclose(predict(ds, net, tile=TILE).values, a)


def test_wrong_out_channels_is_a_clear_task_error():
    ds = synthetic_cube({"time": 1, "lat": 32, "lon": 32}, chunks={})
    with pytest.raises(RuntimeError, match="out_channels"):
        predict(ds, _identity_conv(), tile=TILE, out_channels=3).compute()


@pytest.mark.gpu
def test_cupy_blocks_stay_on_the_gpu():
    cupy = pytest.importorskip("cupy")
    import dask.array as da
    import xarray as xr

    ds = synthetic_cube(SHAPE, chunks={"lat": 45}).compute()
    gpu = xr.Dataset({v: (ds[v].dims, da.from_array(cupy.asarray(ds[v].values), chunks=(1, 45, 70),
                                                    asarray=False)) for v in ds.data_vars})
    out = predict(gpu, _identity_conv().cuda(), tile=TILE, device="cuda", precision="fp32")
    assert type(out.data._meta).__module__.startswith("cupy")
    v = out.data.compute(scheduler="sync")
    assert isinstance(v, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(v), ds["lst"].values, rtol=1e-5, atol=1e-4)
    # precision="auto" is bf16 autocast on CUDA: 8 bits of mantissa, ~0.4 % relative
    auto = predict(gpu, _identity_conv().cuda(), tile=TILE, device="cuda")
    v = cupy.asnumpy(auto.data.compute(scheduler="sync"))
    np.testing.assert_allclose(v, ds["lst"].values, rtol=1e-2, atol=1e-2)


def test_serialized_module_round_trip():
    net = nn.Sequential(nn.Linear(3, 2))
    p = serialize_model(net)
    assert p.kind == "module" and p.digest == serialize_model(net).digest
    loaded = torch.load(io.BytesIO(p.data), weights_only=False)
    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded(x), net(x))


def test_benchmark_figures_on_the_tiny_size():
    from benchmarks import bench_predict as mod

    threads = torch.get_num_threads()
    res = mod.run("tiny")
    assert torch.get_num_threads() == threads
    assert res["tiled"]["tiles_run"] == 2 * grid_padding(128, 32, 16).windows ** 2 == 162
    assert res["tiled"]["ratio"] > 0 and res["pointwise"]["pixels"] == 2 * 128 * 128


def test_serialising_an_unchanged_model_again_is_free_and_a_changed_one_is_not():
    """predict() twice with the same registered-architecture module reuses its payload;
    an optimiser step, load_state_dict or an in-place edit makes a new one."""
    from engine.ml.registry import build_architecture

    net = build_architecture("conv_net", in_channels=3, hidden=4, layers=2)
    first = serialize_model(net)
    assert serialize_model(net) is first
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    stepped = serialize_model(net)
    assert stepped is not first and stepped.digest != first.digest
    with torch.no_grad():
        next(net.parameters()).fill_(0.5)
    assert serialize_model(net).digest not in (first.digest, stepped.digest)
    net.load_state_dict(torch.load(io.BytesIO(first.data), weights_only=True))
    assert serialize_model(net).digest == first.digest


def test_tiled_graph_is_one_inference_and_one_crop_task_per_block():
    """The block is assembled inside the inference task: no gathered block is a task
    result (nothing of it is held in dask's memory or sent between workers), and the
    inference tasks return only the blocks' cores."""
    ds = synthetic_cube({"time": 4, "lat": 96, "lon": 96}, chunks={"time": 1, "lat": 48})
    out = predict(ds, _identity_conv(), tile=TILE)
    layers = out.data.__dask_graph__().layers
    infer = [n for n in layers if n.startswith("predict-tiles-")]
    crop = [n for n in layers if n.startswith("crop-")]
    assert len(infer) == len(crop) == 1
    assert not [n for n in layers if n.startswith("windows-")]
    assert len(layers[infer[0]]) == len(layers[crop[0]]) == 8
    # each inference task returns its block's core: along lat the cores of one step tile
    # the padded axis exactly (halo-extended blocks would overlap)
    keys = sorted(k for k in layers[infer[0]] if k[1] == 0)
    cores = dask.get(dict(out.data.__dask_graph__()), keys)
    pad = grid_padding(96, 32, 16)
    assert sum(c.shape[-2] for c in cores) == pad.before + 96 + pad.after
    assert {c.shape[-1] for c in cores} == {pad.before + 96 + pad.after}


def test_thread_work_buffers_are_reused_and_never_returned():
    """Blocks in one thread reuse its work buffers (the fresh pages of a new buffer cost
    more than the copy into it), yet every returned block is a fresh array: two
    predictions computed one after the other equal each computed alone, with any
    buffer budget."""
    import engine.ml.predict as P

    a = synthetic_cube({"time": 2, "lat": 80, "lon": 64}, chunks={"time": 1}, seed=1)
    b = synthetic_cube({"time": 2, "lat": 80, "lon": 64}, chunks={"time": 1}, seed=2)
    net = _net(3)
    want = [predict(x, net, tile=TILE, fill_value=0.0).compute(scheduler="sync").values
            for x in (a, b)]
    for mib in (0, 64):
        with dask.config.set({"engine.predict.scratch-mib": mib}):
            P._SCRATCH.__dict__.pop("bufs", None)
            got = dask.compute(predict(a, net, tile=TILE, fill_value=0.0),
                               predict(b, net, tile=TILE, fill_value=0.0),
                               scheduler="sync")
            kept = P._SCRATCH.__dict__.get("bufs", {})
            assert (len(kept) > 0) == (mib > 0)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g.values, w)
                assert not any(np.shares_memory(g.values, buf) for buf in kept.values())
