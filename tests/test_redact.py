"""One redaction helper: secrets are hidden by default, wherever they sit."""

import json

import numpy as np
import pytest

from engine.redact import MASK, is_secret_key, redact, redact_options, redact_text, redact_url

SECRETS = {
    "key": "AKIAEXAMPLEKEY", "secret": "s3cr3t-aws", "token": "sess-tok",
    "client_kwargs": {"region_name": "eu-west-1",
                      "headers": {"Authorization": "Bearer oauth-bearer"}},
    "account_key": "azure-account-key", "sas_token": "sv=2020&sig=azure-sig",
    "client_secret": "oauth-client-secret", "credentials": {"private_key": "pk-gcs"},
    "some_new_backend_option": "unknown-value",
    "endpoint_url": "http://minio:minio-pass@127.0.0.1:9000",
    "anon": False, "use_ssl": True,
}


def test_storage_options_are_redacted_by_default():
    out = redact_options(SECRETS)
    text = json.dumps(out)
    for value in ("AKIAEXAMPLEKEY", "s3cr3t-aws", "sess-tok", "oauth-bearer",
                  "azure-account-key", "azure-sig", "oauth-client-secret", "pk-gcs",
                  "unknown-value", "minio-pass"):
        assert value not in text
    # harmless settings stay readable
    assert out["anon"] is False and out["use_ssl"] is True
    assert out["client_kwargs"]["region_name"] == "eu-west-1"
    assert out["endpoint_url"] == f"http://minio:{MASK}@127.0.0.1:9000"


def test_nested_structures_and_urls():
    spec = {"input": {"url": "https://user:pw-123@host/x.zarr?sig=abc&se=2030",
                      "storage_options": SECRETS},
            "tracking": {"uri": "https://u:mlflow-pw@mlflow/", "password": "p"},
            "name": "job", "list": ["s3://b/k?X-Amz-Signature=zzz", 3]}
    text = json.dumps(redact(spec))
    for value in ("pw-123", "abc", "2030", "mlflow-pw", '"p"', "zzz", "AKIAEXAMPLEKEY"):
        assert value not in text
    assert redact(spec)["name"] == "job" and redact(spec)["list"][1] == 3


@pytest.mark.parametrize("url", ["memory:///a/b", "s3://bucket/key.zarr", "/local/path",
                                 "file:///tmp/x.zarr", "https://host/path"])
def test_urls_without_secrets_are_unchanged(url):
    assert redact_url(url) == url


def test_text_and_arrays():
    assert "pw" not in redact_text("cannot open https://a:pw@h/x: 403")
    assert redact({"token": np.arange(3)})["token"] == MASK
    assert redact({"token": None, "key": ""}) == {"token": None, "key": ""}


@pytest.mark.parametrize("name, secret", [
    ("password", True), ("aws_secret_access_key", True), ("sessionToken", True),
    ("Authorization", True), ("connection_string", True), ("AccountKey", True),
    ("sigma", False), ("monkey", False), ("name", False), ("keys", True), ("sas", True),
])
def test_secret_key_names(name, secret):
    assert is_secret_key(name) is secret
