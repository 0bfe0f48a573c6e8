"""Catalogs are data: nothing in one is imported or run, environment variables are read
only when allowed, secrets are never shown, and remote catalogs cannot reach local files."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import pickle
import shutil
import sys
import textwrap
import threading

import dask
import fsspec
import pytest
import xarray as xr
import yaml

from engine.errors import CatalogError
from engine.io.catalog import describe_entry, list_entries, open_cube, read_entry
from engine.io.catalog_urls import local_target, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "catalogs", "demo.yaml")
DEMO_V1 = os.path.join(ROOT, "catalogs", "demo_v1.yaml")
STORE = os.path.join(ROOT, "catalogs", "data", "coads_climatology.zarr")
READER = "intake.readers.readers:XArrayDatasetReader"
ZARR = "intake.readers.datatypes:Zarr"


def _catalog(data: dict, entries: dict, **top) -> str:
    return yaml.safe_dump({"version": 2, "data": data, "entries": entries, **top})


def _good(url: str = "c.zarr", **entry_kwargs) -> tuple[dict, dict]:
    data = {"store": {"datatype": ZARR, "kwargs": {"url": url}}}
    entry = {"reader": READER, "kwargs": {"args": ["{data(store)}"], **entry_kwargs}}
    return data, {"cube": entry}


def _refused(path, entry="cube", match=None, **kwargs) -> str:
    """Every public function refuses the catalog with one CatalogError line."""
    messages = set()
    for call in (
        lambda: list_entries(path, **kwargs),
        lambda: read_entry(path, entry, **kwargs),
        lambda: open_cube(path, entry, **kwargs),
        lambda: describe_entry(path, entry, **kwargs),
    ):
        with pytest.raises(CatalogError, match=match) as err:
            call()
        msg = str(err.value)
        assert msg and "\n" not in msg, msg
        messages.add(msg)
    assert len(messages) == 1, messages
    return messages.pop()


@pytest.fixture
def no_intake(monkeypatch):
    """Any import of intake (or of its subpackages) fails while parsing."""
    for name in [m for m in sys.modules if m == "intake" or m.startswith("intake.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "intake", None)


# ------------------------------------------------------------------ code in catalogs


def test_parsing_needs_no_intake(no_intake, tmp_path):
    with pytest.raises(ImportError):
        import intake  # noqa: F401
    assert [e["name"] for e in list_entries(DEMO)] == ["coads_climatology"]
    assert [e["name"] for e in list_entries(DEMO_V1)] == ["coads_climatology"]
    ds = open_cube(DEMO, "coads_climatology", variables=["SST"])
    assert dict(ds.sizes) == {"time": 12, "lat": 90, "lon": 180}


def test_intake_conf_set_then_pickle_template_is_refused(tmp_path):
    """datatype intake.config:conf.set turns pickles on; a pickle64 template then runs."""
    marker = tmp_path / "pickled"
    payload = base64.b64encode(pickle.dumps(_Touch(str(marker)))).decode()
    data = {
        "unlock": {"datatype": "intake.config:conf.set", "kwargs": {"allow_pickle": True}},
        "store": {"datatype": ZARR, "kwargs": {"url": STORE}},
    }
    entries = {
        "cube": {
            "reader": READER,
            "kwargs": {"args": ["{data(store)}"], "a_unlock": "{data(unlock)}",
                       "b_then": "{pickle64(" + payload + ")}"},
        }
    }
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    with pytest.raises(CatalogError) as err:
        open_cube(path, "cube")
    assert not marker.exists()
    msg = _refused(path, match="intake.config:conf.set")
    assert "not an intake class" in msg and str(err.value) == msg
    assert not marker.exists()


def test_intake_allow_pickle_is_unchanged(tmp_path):
    intake_config = pytest.importorskip("intake.config")
    before = intake_config.conf["allow_pickle"]
    data = {"unlock": {"datatype": "intake.config:conf.set", "kwargs": {"allow_pickle": True}}}
    data.update(_good(STORE)[0])
    entries = _good()[1]
    entries["cube"]["kwargs"]["x_unlock"] = "{data(unlock)}"
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    _refused(path)
    assert intake_config.conf["allow_pickle"] == before is False


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_torch_hub_load_of_a_hubconf_beside_the_catalog_is_refused(tmp_path):
    marker = tmp_path / "hub-ran"
    (tmp_path / "hubconf.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef cube(**kw):\n    return None\n"
    )
    data = {
        "model": {
            "datatype": "torch.hub:load",
            "kwargs": {"repo_or_dir": "{CATALOG_DIR}", "model": "cube", "source": "local",
                       "trust_repo": True},
        },
        **_good(STORE)[0],
    }
    entries = {"cube": {"reader": READER, "kwargs": {"args": ["{data(model)}"]}}}
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    msg = _refused(path)
    assert not marker.exists()
    assert "torch.hub:load" in msg


def test_dask_config_set_of_a_scheduler_preload_is_refused(tmp_path):
    (tmp_path / "evil.py").write_text("raise SystemExit('preloaded')\n")
    before = dask.config.get("distributed.scheduler.preload", None)
    data = {
        "cfg": {
            "datatype": "dask.config:set",
            "kwargs": {"distributed__scheduler__preload": ["{CATALOG_DIR}/evil.py"]},
        },
        **_good(STORE)[0],
    }
    entries = _good()[1]
    entries["cube"]["kwargs"]["args"] = ["{data(cfg)}"]
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    msg = _refused(path)
    assert dask.config.get("distributed.scheduler.preload", None) == before
    assert str(tmp_path) not in json.dumps(dask.config.config, default=str)
    assert "dask.config:set" in msg


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d, e: d["store"].update(datatype="os:system"), "'os:system'"),
        (lambda d, e: e["cube"].update(reader="builtins:eval"), "'builtins:eval'"),
        (lambda d, e: e["cube"].update(reader="builtins.eval"), "'builtins.eval'"),
        (lambda d, e: e["cube"].update(metadata={"a": ["{data(store)}"]}),
         r"entry 'cube' metadata contains a \{data\(...\)\}"),
        (lambda d, e: d["store"].update(metadata={"x": "{data(store)}"}), "data item 'store'"),
        (lambda d, e: e["cube"]["kwargs"].update(group="{func(os:getcwd)}"), r"\{func"),
        (lambda d, e: e["cube"]["kwargs"].update(group="{import(os:getcwd)}"), r"\{import"),
        (lambda d, e: e["cube"]["kwargs"].update(drop_variables="{data(store)}"), r"\{data"),
        (lambda d, e: d["store"]["kwargs"].update(url="{pickle64(gASVAA==)}"), r"\{pickle64"),
        (lambda d, e: e["cube"]["kwargs"].update(args=["{data(store)}", "x"]), "once"),
        (lambda d, e: e["cube"]["kwargs"].update(args=["{data(cube)}"]), "not an item of data"),
        (lambda d, e: e["cube"]["kwargs"].update(backend_kwargs={"x": 1}), "'backend_kwargs'"),
        (lambda d, e: e["cube"]["kwargs"].update(engine="pydap"), "engine 'pydap'"),
        (lambda d, e: d["store"]["kwargs"].update(fs="x"), "unknown key 'fs'"),
        (lambda d, e: e["cube"].update(user_parameters={"p": {"cls": "os:system"}}),
         "names class 'os:system'"),
        (lambda d, e: e["cube"].update(user_parameters={"p": {"default": {"a": 1}}}),
         "plain default"),
    ],
)
def test_code_and_unknown_names_are_refused(tmp_path, no_intake, mutate, match):
    data, entries = _good(STORE)
    mutate(data, entries)
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    _refused(path, match=match)


def test_unknown_top_level_key_and_v1_plugins_are_refused(tmp_path):
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(*_good(STORE), hooks={"on_load": "os:system"}))
    _refused(path, match="unknown key 'hooks'")
    path.write_text(textwrap.dedent(f"""\
        plugins:
          source:
            - module: evil_module_that_must_not_be_imported
        sources:
          cube: {{driver: zarr, args: {{urlpath: {STORE}}}}}
        """))
    _refused(path, match="plugins")
    assert "evil_module_that_must_not_be_imported" not in sys.modules


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['touch {marker}']\n",
        "version: 2\nentries: !!python/object/new:os.system ['touch {marker}']\n",
        "sources:\n  cube: !!python/name:os.system\n",
    ],
)
def test_yaml_python_tags_are_refused(tmp_path, text):
    marker = tmp_path / "tagged"
    path = tmp_path / "cat.yaml"
    path.write_text(text.format(marker=marker))
    assert "YAML tag !!python/" in _refused(path)
    assert not marker.exists()


def test_alias_bomb_catalog_is_refused(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefg", "bcdefgh",
                                                                      strict=True)]
    path = tmp_path / "cat.yaml"
    path.write_text("version: 2\nmetadata:\n" + "\n".join("  " + x for x in lines) + "\n")
    assert "anchor &a" in _refused(path)


def test_unsupported_intake_entries_fail_alone(tmp_path):
    """A mixed catalog (a CSV table beside a cube) still opens its cube."""
    shutil.copytree(STORE, tmp_path / "c.zarr")
    data, entries = _good()
    data["table"] = {"datatype": "intake.readers.datatypes:CSV", "kwargs": {"url": "t.csv"}}
    entries["table"] = {"reader": "intake.readers.readers:PandasCSV",
                        "kwargs": {"args": ["{data(table)}"]}}
    entries["cube_of_csv"] = {"reader": READER, "kwargs": {"args": ["{data(table)}"]}}
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    assert dict(open_cube(path, "cube").sizes) == {"time": 12, "lat": 90, "lon": 180}
    with pytest.raises(CatalogError, match="uses reader intake.readers.readers:PandasCSV"):
        read_entry(path, "table")
    with pytest.raises(CatalogError, match="datatype intake.readers.datatypes:CSV"):
        read_entry(path, "cube_of_csv")


def test_hdf5_path_and_user_parameters(tmp_path):
    ds = xr.Dataset({"v": ("lat", [1.0, 2.0])}, coords={"lat": [0.0, 1.0]})
    ds.to_netcdf(tmp_path / "f.nc", engine="h5netcdf", group="inner")
    data = {
        "h5": {
            "datatype": "intake.readers.datatypes:HDF5",
            "kwargs": {"url": "{CATALOG_DIR}/{stem}.nc", "path": "inner"},
            "user_parameters": {"stem": {"default": "f", "description": "", "dtype": "object"}},
        }
    }
    entries = {"cube": {"reader": READER, "kwargs": {"args": ["{data(h5)}"]}}}
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    entry = read_entry(path, "cube")
    assert entry.url == str(tmp_path / "f.nc") and entry.open_kwargs["group"] == "inner"
    assert open_cube(path, "cube")["v"].values.tolist() == [1.0, 2.0]


# ----------------------------------------------------------------------- environment


def _env_catalog(tmp_path, url="{CATALOG_DIR}/{env(CE_TEST_STORE)}", options=None):
    shutil.copytree(STORE, tmp_path / "stores" / "c.zarr")
    data, entries = _good(url)
    if options is not None:
        data["store"]["kwargs"]["storage_options"] = options
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    return path


def test_env_templates_are_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("CE_TEST_STORE", "stores/c.zarr")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    path = _env_catalog(tmp_path, "http://h/{env(AWS_SECRET_ACCESS_KEY)}/c.zarr")
    msg = _refused(path)
    assert "AWS_SECRET_ACCESS_KEY" in msg and "s3cr3t-value" not in msg
    assert "allow_env=['AWS_SECRET_ACCESS_KEY']" in msg and "engine.catalog.allow-env" in msg
    # another variable is allowed, not this one
    _refused(path, allow_env=["CE_TEST_STORE"], match="AWS_SECRET_ACCESS_KEY")


def test_env_allowed_by_argument_or_config_and_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("CE_TEST_STORE", "stores/c.zarr")
    path = _env_catalog(tmp_path)
    expected = str(tmp_path / "stores" / "c.zarr")
    assert read_entry(path, "cube", allow_env=["CE_TEST_STORE"]).url == expected
    with dask.config.set({"engine.catalog.allow-env": ["CE_TEST_STORE"]}):
        ds = open_cube(path, "cube")
        (listed,) = list_entries(path)
        info = describe_entry(path, "cube")
    assert dict(ds.sizes) == {"time": 12, "lat": 90, "lon": 180}
    assert listed["url"] == info["url"] == f"{tmp_path}/{{env(CE_TEST_STORE)}}"
    assert "stores/c.zarr" not in json.dumps(info, default=str)
    # the keyword wins over the config
    with dask.config.set({"engine.catalog.allow-env": ["CE_TEST_STORE"]}):
        _refused(path, allow_env=[], match="CE_TEST_STORE")


def test_env_values_stay_out_of_errors_and_listings(tmp_path, monkeypatch):
    monkeypatch.setenv("CE_TEST_STORE", "missing-store-name.zarr")
    monkeypatch.setenv("CE_TEST_TOKEN", "tok-9f8e7d6c")
    path = _env_catalog(tmp_path, options={"token": "{env(CE_TEST_TOKEN)}",
                                           "endpoint_url": "http://{env(CE_TEST_TOKEN)}@h"})
    allow = ["CE_TEST_STORE", "CE_TEST_TOKEN"]
    entry = read_entry(path, "cube", allow_env=allow)
    assert entry.storage_options["token"] == "tok-9f8e7d6c"  # the real value opens data
    assert "tok-9f8e7d6c" not in repr(entry)
    (listed,) = list_entries(path, allow_env=allow)
    assert "tok-9f8e7d6c" not in json.dumps(listed) and "missing-store" not in json.dumps(listed)
    with pytest.raises(CatalogError) as err:
        open_cube(path, "cube", allow_env=allow, storage_options={"token": None,
                                                                   "endpoint_url": None})
    assert "missing-store-name" not in str(err.value) and "{env(CE_TEST_STORE)}" in str(err.value)


def test_allowed_but_unset_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CE_TEST_STORE", raising=False)
    path = _env_catalog(tmp_path)
    _refused(path, allow_env=["CE_TEST_STORE"], match="CE_TEST_STORE, which is not set")


def test_v1_env_is_opt_in_too(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME_SECRET", "hunter2")
    path = tmp_path / "cat.yaml"
    path.write_text("sources:\n  cube:\n    driver: zarr\n    args:\n"
                    "      urlpath: 'http://h/{{ env(HOME_SECRET) }}/c.zarr'\n")
    msg = _refused(path, match="HOME_SECRET")
    assert "hunter2" not in msg
    assert read_entry(path, "cube", allow_env=["HOME_SECRET"]).url == "http://h/hunter2/c.zarr"


# ----------------------------------------------------------------------- credentials


@pytest.fixture
def http_dir(tmp_path):
    """tmp_path served over HTTP on 127.0.0.1 (any user:password is accepted)."""
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_passwords_in_catalog_urls_are_never_shown(tmp_path, http_dir):
    shutil.copytree(STORE, tmp_path / "c.zarr")
    (tmp_path / "cat.yaml").write_text(_catalog(*_good("c.zarr", consolidated=True)))
    url = f"http://reader:hunter2@{http_dir}/cat.yaml"
    entry = read_entry(url, "cube")
    assert entry.url == f"http://reader:hunter2@{http_dir}/c.zarr"  # real, to open with
    assert "hunter2" not in repr(entry)
    (listed,) = list_entries(url)
    assert listed["url"] == f"http://reader:***@{http_dir}/c.zarr"
    ds = open_cube(url, "cube", variables=["SST"])
    assert ds.attrs["engine_catalog"] == f"http://reader:***@{http_dir}/cat.yaml"
    assert float(ds.SST.isel(time=0).mean()) == pytest.approx(
        float(xr.open_zarr(STORE).SST.isel(time=0).mean()))
    info = describe_entry(url, "cube")
    assert info["catalog"] == ds.attrs["engine_catalog"]
    assert "hunter2" not in json.dumps(info, default=str)
    for bad in (lambda: open_cube(url, "cub"),
                lambda: open_cube(url.replace("cat.yaml", "nope.yaml"), "cube"),
                lambda: open_cube(f"http://reader:hunter2@{http_dir}/cat2.yaml", "cube")):
        with pytest.raises(CatalogError) as err:
            bad()
        assert "hunter2" not in str(err.value) and "reader:***@" in str(err.value)


def test_credentials_in_metadata_options_and_store_attrs_are_redacted(tmp_path):
    store = tmp_path / "c.zarr"
    shutil.copytree(STORE, store)
    ds = xr.open_zarr(store)
    ds.attrs["source"] = "https://u:pw-in-attrs@host/x.nc?sig=abc"
    ds.to_zarr(tmp_path / "d.zarr", zarr_format=3, consolidated=False)
    data, entries = _good("d.zarr", consolidated=False)
    data["store"]["kwargs"]["storage_options"] = {"secret": "opt-secret", "anon": False}
    entries["cube"]["metadata"] = {"password": "meta-secret",
                                   "mirror": "ftp://me:ftp-secret@host/x"}
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    (listed,) = list_entries(path)
    info = describe_entry(path, "cube", storage_options={"secret": None})
    for shown in (json.dumps(listed), json.dumps(info, default=str)):
        for secret in ("opt-secret", "meta-secret", "ftp-secret", "pw-in-attrs", "sig=abc"):
            assert secret not in shown, secret
    assert info["provenance"]["source"] == "https://u:***@host/x.nc?sig=***"


# ----------------------------------------------------------------------- remote -> local


@pytest.fixture
def memory_catalog():
    fs = fsspec.filesystem("memory")
    root = f"trust-{os.getpid()}-{id(fs)}"
    fs.mkdir(root)

    def write(url: str, name: str = "cat.yaml", **kwargs) -> str:
        fs.pipe(f"/{root}/{name}", _catalog(*_good(url, **kwargs)).encode())
        return f"memory://{root}/{name}"

    write.fs, write.root = fs, root
    yield write
    fs.rm(f"/{root}", recursive=True)


@pytest.mark.parametrize(
    "url",
    [STORE, f"file://{STORE}", f"simplecache::file://{STORE}", "local:///etc/passwd",
     "~/data/c.zarr", f"reference://?fo={STORE}"],
)
def test_remote_catalog_may_not_open_local_files(memory_catalog, url):
    cat = memory_catalog(url)
    msg = _refused(cat, match="points at local data")
    assert "allow_local=True" in msg and "engine.catalog.allow-local-from-remote" in msg


def test_remote_catalog_local_data_when_allowed(memory_catalog):
    cat = memory_catalog(STORE, consolidated=True)
    assert dict(open_cube(cat, "cube", allow_local=True).sizes)["lat"] == 90
    with dask.config.set({"engine.catalog.allow-local-from-remote": True}):
        assert read_entry(cat, "cube").url == STORE
    with dask.config.set({"engine.catalog.allow-local-from-remote": True}):
        _refused(cat, allow_local=False, match="points at local data")


def test_remote_catalog_local_target_in_storage_options(memory_catalog):
    cat_url = memory_catalog("simplecache::memory://x/c.zarr")
    fs, root = memory_catalog.fs, memory_catalog.root
    data, entries = _good("simplecache::memory://x/c.zarr")
    data["store"]["kwargs"]["storage_options"] = {"simplecache": {"target_protocol": "file"}}
    fs.pipe(f"/{root}/cat.yaml", _catalog(data, entries).encode())
    _refused(cat_url, match="target_protocol: file")


def test_remote_catalog_opens_remote_data_with_dotdot_resolved(memory_catalog):
    fs, root = memory_catalog.fs, memory_catalog.root
    fs.put(STORE, f"/{root}/data/c.zarr", recursive=True)
    cat = memory_catalog("../data/c.zarr", name="sub/cat.yaml", consolidated=True)
    entry = read_entry(cat, "cube")
    assert entry.url == f"memory://{root}/data/c.zarr"
    ds = open_cube(cat, "cube", variables=["SST"])
    xr.testing.assert_equal(ds.SST.load(), xr.open_zarr(STORE).SST.load())
    # however many "..", a relative path stays on the catalog's filesystem
    assert resolve("../../../../etc/passwd", "memory://a/b") == "memory://a/etc/passwd"
    assert resolve("../../x", "s3://bucket/cats") == "s3://bucket/x"
    assert local_target(resolve("../../../etc/passwd", "https://h/a")) is None


def test_local_catalog_may_open_local_data_above_it(tmp_path):
    shutil.copytree(STORE, tmp_path / "data" / "c.zarr")
    (tmp_path / "cats").mkdir()
    path = tmp_path / "cats" / "cat.yaml"
    path.write_text(_catalog(*_good("../data/c.zarr")))
    assert read_entry(path, "cube").url == str(tmp_path / "data" / "c.zarr")
    assert dict(open_cube(path, "cube").sizes)["lon"] == 180


def test_parameters_naming_parameters_neither_loop_nor_multiply(tmp_path):
    data, entries = _good("{a}")
    entries["cube"]["user_parameters"] = {
        "a": {"default": "{b}{b}"}, "b": {"default": "{a}{a}"}, "c": {"default": "{c}"}
    }
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, entries))
    _refused(path, match=r"template \{b\}, which is not a parameter")
    data["store"]["kwargs"]["url"] = "{c}"
    path.write_text(_catalog(data, entries))
    _refused(path, match=r"template \{c\}")


def test_aliases_name_entries_only(tmp_path):
    shutil.copytree(STORE, tmp_path / "c.zarr")
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(*_good(), aliases={"short": "cube"}))
    assert [e["name"] for e in list_entries(path)] == ["cube", "short"]
    assert read_entry(path, "short").url == str(tmp_path / "c.zarr")
    path.write_text(_catalog(*_good(), aliases={"short": "os:system"}))
    _refused(path, entry="short", match="alias 'short' must name an entry")


def test_describe_redacts_array_attributes_with_credential_like_names(tmp_path):
    ds = xr.Dataset({"v": ("lat", [1.0, 2.0])}, coords={"lat": [0.0, 1.0]},
                    attrs={"token_counts": [3, 4], "auth_url": "https://u:pw@h/x"})
    ds.to_netcdf(tmp_path / "f.nc", engine="scipy")  # attrs come back as numpy arrays
    data = {"store": {"datatype": "intake.readers.datatypes:NetCDF3", "kwargs": {"url": "f.nc"}}}
    path = tmp_path / "cat.yaml"
    path.write_text(_catalog(data, _good()[1]))
    info = describe_entry(path, "cube")
    assert info["attrs"]["token_counts"] == [3, 4] and info["attrs"]["auth_url"] == "***"
    json.dumps(info)
