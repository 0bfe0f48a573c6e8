"""engine.ops.tiled: the padded, halo-extended blocks of tiled predict, one task each."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kernels.windows import pad_array
from engine.ops.tiled import crop_blocks, gather_blocks, padded_source_index, plan_tiles

BOUNDARIES = ("reflect", "nearest", "constant", 2.5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), before=st.integers(0, 30), after=st.integers(0, 30),
       mode=st.sampled_from(["reflect", "edge", "constant"]))
def test_source_index_is_np_pad(n, before, after, mode):
    x = np.arange(n) + 10
    want = np.pad(x, (before, after), mode=mode if n > 1 or mode != "reflect" else "edge")
    idx = padded_source_index(0, before + n + after, before, n, mode)
    got = np.where(idx >= 0, x[np.maximum(idx, 0)], 0)
    np.testing.assert_array_equal(got, want)


def _case(data, longest: int, largest_tile: int) -> tuple:
    """A random (time, y, x) case: shape, 2-D tile and stride, chunks, boundary and 1-3
    channels of values."""
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, longest)),
             data.draw(st.integers(1, longest)))
    tile = tuple(data.draw(st.integers(1, largest_tile)) for _ in range(2))
    stride = tuple(data.draw(st.integers(1, t)) for t in tile)
    chunks = tuple(data.draw(st.integers(1, n)) for n in shape)
    boundary = data.draw(st.sampled_from(BOUNDARIES))
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    values = [rng.random(shape, dtype=np.float32) for _ in range(data.draw(st.integers(1, 3)))]
    return shape, tile, stride, chunks, boundary, values


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_gathered_blocks_are_the_padded_array_cut_with_halos(data):
    """Every gathered block equals the same range of the array padded by np.pad, for
    random shapes, chunkings, tiles, strides and boundaries; cropping the blocks' cores
    gives back the input's chunking."""
    shape, tile, stride, chunks, boundary, values = _case(data, 40, 12)
    xs = [da.from_array(v, chunks=chunks) for v in values]
    plan = plan_tiles(shape[1:], xs[0].chunks[1:], tile, stride)
    pads = [(0, 0)] + [(p.before, p.after) for p in plan.pads]
    padded = np.stack([pad_array(v, pads, boundary) for v in values], axis=1)
    ext = gather_blocks(xs, plan, boundary, "g-test")
    with dask.config.set(scheduler="sync"):
        for b0 in range(len(plan.bounds[0]) - 1):
            for b1 in range(len(plan.bounds[1]) - 1):
                (lo0, hi0), (lo1, hi1) = plan.extent(0, b0), plan.extent(1, b1)
                for t in range(len(xs[0].chunks[0])):
                    t0 = sum(xs[0].chunks[0][:t])
                    block = ext.blocks[t, 0, b0, b1].compute()
                    want = padded[t0:t0 + xs[0].chunks[0][t], :, lo0:hi0, lo1:hi1]
                    np.testing.assert_array_equal(block, want)
        # cores of the blocks, cropped back: the padded array's real part, input chunks
        out = crop_blocks(ext, plan, xs[0].chunks, "c-test", squeeze=False)
        assert out.chunks[2:] == xs[0].chunks[1:]
        (r0, r1), (q0, q1) = plan.real
        np.testing.assert_array_equal(out.compute(), padded[:, :, r0:r1, q0:q1])


def test_one_task_per_block_not_a_hundred():
    x = da.zeros((8, 512, 512), chunks=(1, 512, 512))
    plan = plan_tiles((512, 512), x.chunks[1:], (64, 64), (32, 32))
    ext = gather_blocks([x, x, x], plan, "reflect", "g-count")
    layer = ext.__dask_graph__().layers["g-count"]
    assert len(layer) == 8


def _stack_sum(spec, index, scale, *pieces, cores_of=None):
    """A consumer of gathered blocks: channel sum times ``scale`` (from a delayed)."""
    from engine.ops.tiled import gather

    block = gather(spec, pieces)
    out = block.sum(axis=-3, keepdims=True) * scale
    if cores_of is not None:
        plan, k0 = cores_of
        out = out[(Ellipsis, *(plan.core(j, b) for j, b in enumerate(index[k0:])))]
    return out


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_map_gathered_is_gather_then_map_in_one_task(data):
    """map_gathered equals gather_blocks followed by map_blocks, with the block assembled
    inside the consuming task (one task per block, none holding the gathered block), a
    delayed argument resolved, and cores=True giving only the cores, which crop back to
    the same array."""
    from engine.ops.tiled import map_gathered

    shape, tile, stride, chunks, boundary, values = _case(data, 30, 9)
    xs = [da.from_array(v, chunks=chunks) for v in values]
    plan = plan_tiles(shape[1:], xs[0].chunks[1:], tile, stride)
    scale = dask.delayed(2.0, name="scale-test")
    ext = gather_blocks(xs, plan, boundary, "g-ref")
    want = ext.sum(axis=1, keepdims=True) * 2.0
    got = map_gathered(_stack_sum, xs, plan, boundary, "m-test", lead=1,
                       meta=np.empty(0, np.float32), args=(scale,))
    assert got.chunks == want.chunks
    assert len(got.__dask_graph__().layers["m-test"]) == got.npartitions
    cores = map_gathered(_stack_sum, xs, plan, boundary, "m-cores", lead=1,
                         meta=np.empty(0, np.float32), cores=True, args=(scale,),
                         cores_of=(plan, 1))
    assert cores.chunks[2:] == tuple(plan.core_chunks(j) for j in range(2))
    with dask.config.set(scheduler="sync"):
        np.testing.assert_allclose(got.compute(), want.compute(), rtol=1e-6)
        full = crop_blocks(want, plan, xs[0].chunks, "c-ref", squeeze=False).compute()
        np.testing.assert_allclose(
            crop_blocks(cores, plan, xs[0].chunks, "c-cores", squeeze=False,
                        cores=True).compute(), full, rtol=1e-6)


def test_map_gathered_takes_only_delayed_collections_and_keeps_annotations():
    import pytest

    from engine.ops.tiled import map_gathered

    x = da.zeros((2, 64, 64), chunks=(1, 64, 64))
    plan = plan_tiles((64, 64), x.chunks[1:], (16, 16), (8, 8))
    with pytest.raises(TypeError, match="delayed"):
        map_gathered(_stack_sum, [x], plan, "reflect", "m-bad", lead=1,
                     meta=np.empty(0, np.float32), args=(x,))
    with dask.annotate(resources={"GPU": 0.5}):
        y = map_gathered(_stack_sum, [x], plan, "reflect", "m-ann", lead=1,
                         meta=np.empty(0, np.float32), args=(1.0,))
    assert y.__dask_graph__().layers["m-ann"].annotations == {"resources": {"GPU": 0.5}}
