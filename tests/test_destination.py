"""Destination checks: nothing the engine did not write is ever destroyed, inputs are never
outputs, and an unwritable or unreachable output is refused with one line before anything
runs."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import xarray as xr

from engine.errors import ResumeError, StoreError, StoreExistsError
from engine.io import writer
from engine.io.destination import check_destination
from engine.testing.faults import counting_cube

REGIONS = {"time": 4, "lat": 5, "lon": 4}


# the threaded scheduler unless a test passes its own client (conftest.threads_scheduler)
pytestmark = pytest.mark.usefixtures("threads_scheduler")


@pytest.fixture
def cube(tmp_path):
    return counting_cube(tmp_path / "work")


def listing(path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_overwrite_refuses_a_folder_of_user_files(tmp_path, cube):
    url = tmp_path / "results"
    url.mkdir()
    (url / "notes.txt").write_text("keep me")
    (url / "sub").mkdir()
    (url / "sub" / "data.csv").write_text("1,2")
    before = listing(url)
    for kw in ({"overwrite": True}, {"restart": True}, {}):
        with pytest.raises(StoreExistsError, match="not a Zarr store.*nothing was deleted"):
            writer.write(cube, str(url), region_chunks=REGIONS, **kw)
    assert listing(url) == before


def test_overwrite_refuses_a_plain_file(tmp_path, cube):
    path = tmp_path / "out.zarr"
    path.write_text("a file")
    with pytest.raises(StoreExistsError, match="is a file, not a Zarr store") as err:
        writer.write(cube, str(path), overwrite=True)
    one_line(err)
    assert path.read_text() == "a file"


@pytest.mark.parametrize("where", ["..", ".", "parent-abs", "root", "home"])
def test_protected_folders_are_refused(tmp_path, monkeypatch, cube, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (tmp_path / "precious.txt").write_text("x")
    # a Zarr marker, so only the protection (not the "not a store" rule) can refuse it
    (tmp_path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path))
    url = {"..": "..", ".": ".", "parent-abs": str(tmp_path / "a"), "root": "/",
           "home": "~"}[where]
    before = listing(tmp_path)

    def no_delete(*args, **kwargs):
        raise AssertionError(f"the test tried to delete {args}")

    # A regression here must fail, never delete: the code before this check removed
    # whatever was at the output path (rm -rf of "/" as root took /etc with it).
    monkeypatch.setattr("engine.io.stores.remove_store", no_delete)
    monkeypatch.setattr("fsspec.implementations.local.LocalFileSystem.rm", no_delete)
    monkeypatch.setattr("shutil.rmtree", no_delete)
    with pytest.raises(StoreError, match="refusing to use .* as an output store: it is") as err:
        check_destination(url, overwrite=True)
    one_line(err)
    if where != "root":  # every other spelling points inside tmp_path
        with pytest.raises(StoreError, match="refusing"):
            writer.write(cube, url, overwrite=True)
    assert listing(tmp_path) == before


def test_restart_only_recomputes_engine_stores(tmp_path, cube):
    foreign = str(tmp_path / "foreign.zarr")
    xr.Dataset({"other": ("x", np.arange(3))}).to_zarr(foreign, zarr_format=3, consolidated=False)
    before = listing(foreign)
    with pytest.raises(StoreExistsError, match="--restart only recomputes.*--overwrite"):
        check_destination(foreign, restart=True)
    assert listing(foreign) == before
    assert check_destination(foreign, overwrite=True) == "replace"
    assert listing(foreign) == before  # a check deletes nothing

    ours = str(tmp_path / "ours.zarr")
    writer.write(cube, ours, region_chunks=REGIONS, fingerprint={"job": "a"})
    assert check_destination(ours, fingerprint={"job": "a"}) == "resume"
    assert check_destination(ours, restart=True) == "replace"
    with pytest.raises(ResumeError, match=r"different job \(job\): pass --restart"):
        check_destination(ours, fingerprint={"job": "b"})
    res = writer.write(cube, ours, restart=True, region_chunks=REGIONS, fingerprint={"job": "b"})
    assert res.n_written == 12


def test_new_output_is_created(tmp_path):
    assert check_destination(str(tmp_path / "new" / "deeper" / "out.zarr")) == "create"
    assert not os.path.exists(tmp_path / "new")  # the probe removes what it created
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert check_destination(str(empty)) == "create" and os.listdir(empty) == []


@pytest.mark.parametrize("spelling", ["same", "inside", "contains", "relative", "dotdot",
                                      "symlink", "file-url", "trailing-slash"])
def test_output_overlapping_an_input_is_refused(tmp_path, monkeypatch, cube, spelling):
    src = tmp_path / "in.zarr"
    cube.to_zarr(src, zarr_format=3, consolidated=False)
    before = listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    os.symlink(src, tmp_path / "link.zarr")
    out = {
        "same": str(src),
        "inside": str(src / "t2m"),
        "contains": str(tmp_path),
        "relative": "in.zarr",
        "dotdot": str(tmp_path / "x" / ".." / "in.zarr"),
        "symlink": str(tmp_path / "link.zarr"),
        "file-url": f"file://{src}",
        "trailing-slash": f"{src}/",
    }[spelling]
    with pytest.raises(StoreError, match="the input store .*would destroy the input") as err:
        check_destination(out, overwrite=True, inputs=[f"file://{src}/"])
    one_line(err)
    with pytest.raises(StoreError, match="would destroy the input"):
        writer.write(cube, out, overwrite=True, inputs=[str(src)])
    os.remove(tmp_path / "link.zarr")
    assert listing(tmp_path) == before


def test_a_sibling_of_an_input_is_fine(tmp_path):
    src = tmp_path / "in.zarr"
    src.mkdir()
    # a shared name prefix is not containment
    assert check_destination(str(tmp_path / "in.zarr2"), inputs=[str(src)]) == "create"


@pytest.mark.parametrize("case", ["proc", "file-as-parent", "etc-hostname"])
def test_unwritable_destination_is_one_line(tmp_path, cube, case):
    if case == "file-as-parent":
        (tmp_path / "hostname").write_text("a file")
        path = str(tmp_path / "hostname" / "x.zarr")
    else:
        path = {"proc": "/proc/cube-engine-test/x.zarr", "etc-hostname": "/etc/hostname/x.zarr"}[
            case]
        if case == "etc-hostname" and not os.path.isfile("/etc/hostname"):
            pytest.skip("/etc/hostname is not a file on this system")
    with pytest.raises(StoreError) as err:
        writer.write(cube, path)
    msg = one_line(err)
    assert path in msg and "choose" in msg
    assert not os.path.exists(path)
    if case == "file-as-parent":
        assert "is a file, not a folder" in msg
        assert (tmp_path / "hostname").read_text() == "a file"


def _as_nobody(fn) -> str:
    """Run ``fn`` in a forked child without root's rights (root writes anywhere)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
            msg = "ok"
        except BaseException as err:
            msg = f"{type(err).__name__}: {err}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(ro, 0o555)
    url = str(ro / "out.zarr")

    def check():
        check_destination(url)

    try:
        if os.geteuid() == 0:
            out = _as_nobody(check)
        else:
            try:
                check()
                out = "ok"
            except StoreError as err:
                out = f"StoreError: {err}"
    finally:
        os.chmod(ro, 0o755)
    assert out.startswith("StoreError: cannot write output store"), out
    assert url in out and "\n" not in out
    assert os.listdir(ro) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_s3_endpoint_is_one_line(cube, tmp_path):
    pytest.importorskip("s3fs")
    so = {"key": "k", "secret": "very-secret-value",
          "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_closed_port()}"},
          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    with pytest.raises(StoreError, match="cannot reach output store s3://b/out.zarr.*endpoint") \
            as err:
        writer.write(cube, "s3://b/out.zarr", storage_options=so)
    assert "very-secret-value" not in one_line(err)


def test_s3_without_credentials_is_one_line(monkeypatch, tmp_path, cube):
    pytest.importorskip("moto.server")
    from engine.testing.s3 import moto_s3

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with moto_s3() as s3:
        so = {"client_kwargs": {"endpoint_url": s3.endpoint_url}, "skip_instance_cache": True}
        with pytest.raises(StoreError, match=r"s3://.*NoCredentialsError.*credentials") as err:
            writer.write(cube, s3.url("out.zarr"), storage_options=so)
        one_line(err)
        assert not s3.filesystem().exists(f"{s3.bucket}/out.zarr")


def test_remove_store_refuses_what_is_not_a_store(tmp_path, monkeypatch):
    """The last guard inside the delete itself, whatever its caller checked."""
    import fsspec

    from engine.io import stores

    fs = fsspec.filesystem("file")
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(StoreError, match="not a Zarr store"):
        stores.remove_store(fs, str(folder))
    monkeypatch.chdir(folder)
    (folder / "zarr.json").write_text("{}")
    for protected in (str(folder), str(tmp_path)):
        with pytest.raises(StoreError, match="not an output store"):
            stores.remove_store(fs, protected)
    assert (folder / "notes.txt").read_text() == "keep"
