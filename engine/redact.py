"""Secrets never leave the process: one redaction helper for everything persisted, logged,
printed or hashed.

Redaction is by default. In storage options (fsspec keyword arguments) only keys known to
carry no secret are kept (``anon``, ``endpoint_url``, ``region_name``, block sizes, ...);
every other value becomes ``"***"``, so a new backend's token, an ``Authorization`` header,
an Azure account key or an OAuth client secret is hidden without being listed. In URLs the
password of ``user:password@host`` and the value of every query parameter (SAS tokens,
pre-signed signatures) are hidden. Anywhere else in a nested structure, a key whose name
looks like a credential (``password``, ``secret``, ``token``, ``key``, ``auth``,
``credential``, ``signature``, ...) is hidden.

A fingerprint (resume identity) is computed from :func:`redact` output, so rotating a
secret never changes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "redact", "redact_options", "redact_url", "redact_text", "is_secret_key"]

MASK = "***"

#: Storage-option keys that never hold a secret (kept as they are). Everything else is hidden.
SAFE_OPTION_KEYS = frozenset({
    "anon", "endpoint_url", "region_name", "region", "use_ssl", "verify", "requester_pays",
    "default_block_size", "block_size", "default_fill_cache", "default_cache_type",
    "cache_type", "fill_cache", "consistency", "skip_instance_cache", "use_listings_cache",
    "listings_expiry_time", "max_paths", "version_aware", "asynchronous", "loop",
    "auto_mkdir", "project", "access", "requests_timeout", "timeout", "connect_timeout",
    "read_timeout", "retries", "max_attempts", "mode", "signature_version",
    "addressing_style", "s3", "client_kwargs", "config_kwargs",
    "simple_links", "same_scheme", "size_policy", "cache_timeout", "target_protocol",
    "target_options", "remote_protocol", "remote_options", "fo", "max_concurrency",
    "account_name", "protocol", "path_style",
})

#: Keys that hold nested storage options (their values are redacted with the same rule).
_NESTED_OPTION_KEYS = frozenset({"client_kwargs", "config_kwargs", "s3", "target_options",
                                 "remote_options"})

_SECRET_TOKENS = frozenset({
    "password", "passwd", "pass", "pwd", "passphrase", "secret", "secrets", "token", "tokens",
    "key", "keys", "apikey", "auth", "authorization", "credential", "credentials",
    "signature", "sig", "sas", "cookie", "cookies", "session", "bearer", "jwt", "cert",
    "private", "accountkey", "connectionstring", "otp", "pin",
})
_OPTION_CONTAINERS = ("storage_options", "so", "options", "target_options", "remote_options")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [t for t in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if t]


def is_secret_key(name: Any) -> bool:
    """Whether a key named ``name`` looks like it holds a credential.

    >>> [is_secret_key(k) for k in ("aws_secret_access_key", "sessionToken", "sigma", "keys")]
    [True, True, False, True]
    """
    toks = _tokens(str(name))
    joined = "".join(toks)
    return any(t in _SECRET_TOKENS for t in toks) or joined in _SECRET_TOKENS or \
        "connectionstring" in joined or "accountkey" in joined


def redact_url(url: str) -> str:
    """``url`` with the password of its user info and every query value hidden.

    >>> redact_url("https://user:pw@host/data.zarr?sv=1&sig=abc")
    'https://user:***@host/data.zarr?sv=***&sig=***'
    """
    if not isinstance(url, str) or not _URL.match(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc and not parts.query:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK) for k, _ in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside free ``text`` (an error message, a log line) redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


def redact_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options with every value not known to be harmless hidden.

    >>> redact_options({"key": "AKIA", "secret": "s", "endpoint_url": "http://h:9000",
    ...                 "client_kwargs": {"region_name": "eu", "headers": {"Authorization": "x"}}})
    {'key': '***', 'secret': '***', 'endpoint_url': 'http://h:9000', \
'client_kwargs': {'region_name': 'eu', 'headers': '***'}}
    """
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        k = str(key)
        if k in _NESTED_OPTION_KEYS and isinstance(value, Mapping):
            out[k] = redact_options(value)
        elif k in SAFE_OPTION_KEYS and not isinstance(value, Mapping):
            out[k] = redact_url(value) if isinstance(value, str) else value
        elif value is None or value == "" or value is False:
            out[k] = value
        else:
            out[k] = MASK
    return out


def _is_secret_value(value: Any) -> bool:
    """A scalar that may hold a secret (not None, empty, a flag or a container)."""
    if value is None or isinstance(value, (bool, Mapping, list, tuple)):
        return False
    if isinstance(value, (str, bytes)):
        return len(value) > 0
    return not hasattr(value, "shape") or getattr(value, "size", 1) > 0


def redact(obj: Any) -> Any:
    """A copy of a nested structure (dicts, lists, strings) safe to persist, log or hash.

    Storage options (under a key named ``storage_options``) are redacted by
    :func:`redact_options`; URLs anywhere by :func:`redact_url`; any other key that looks
    like a credential (:func:`is_secret_key`) is hidden.
    """
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            if str(key) in _OPTION_CONTAINERS and isinstance(value, Mapping):
                out[key] = redact_options(value)
            elif is_secret_key(key) and _is_secret_value(value):
                out[key] = MASK
            else:
                out[key] = redact(value)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_url(obj) if _URL.match(obj) else obj
    return obj
