"""Redaction: credentials never reach logs, messages or stored configs.

By name: option and config keys that name a credential (case-insensitive, at any depth).
By shape: URL userinfo, `name=value` pairs with such a name, `Bearer` tokens, AWS key ids and
40-character secrets inside any text. `pipeline.storage` re-exports these functions.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

SECRET_WORDS = ("secret", "password", "passwd", "passphrase", "token", "credential", "session", "private",
                "authorization", "cookie", "signature", "connection_string", "connectionstring", "apikey",
                "api_key", "accesskey", "access_key")
_SECRET_NAME_WORDS = {"key", "keys", "pwd", "pass", "auth", "sas", "sig", "jwt", "bearer", "otp"}
_NOT_SECRET_NAMES = {"label_key", "sort_key", "key_field"}
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]*:[^/\s@]*@")
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{6,}", re.IGNORECASE)
_NAMED_VALUE = re.compile(r"""(["']?([A-Za-z][A-Za-z0-9_.-]*)["']?\s*[:=]\s*["']?)(?!//)([^"'\s,;&}\])]+)""")
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
_LONG_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")


def is_secret_name(name: str) -> bool:
    """Whether an option/config name holds a credential (key, secret, token, password, ...).

    Case-insensitive, on the words of the name (`aws_access_key_id`, `AccountKey`, `headers.Authorization`).
    """
    low = name.lower()
    if low in _NOT_SECRET_NAMES:
        return False
    if any(w in low for w in SECRET_WORDS):
        return True
    words = set(re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()))
    return bool(words & _SECRET_NAME_WORDS)


def redact_text(text: str) -> str:
    """`text` with credential-shaped values replaced by '***'.

    Catches URL userinfo (`scheme://user:pw@`), `name=value` / `"name": value` pairs whose name
    is a credential's, `Bearer`/`Basic` tokens, AWS access key ids and 40-character secrets.
    """
    out = _URL_USERINFO.sub(lambda m: m.group(1) + "***@", text)
    out = _AUTH_SCHEME.sub(lambda m: m.group(1) + " ***", out)
    out = _NAMED_VALUE.sub(lambda m: m.group(1) + "***" if is_secret_name(m.group(2)) else m.group(0), out)
    out = _ACCESS_KEY_ID.sub("***", out)
    return _LONG_SECRET.sub(lambda m: "***" if _mixed(m.group(0)) else m.group(0), out)


def _mixed(token: str) -> bool:
    return any(c.islower() for c in token) and any(c.isupper() for c in token) and any(c.isdigit() for c in token)


def redact(value: Any) -> Any:
    """A copy of `value` safe to log or store: credential-named entries of nested dicts/lists
    become '***' and every string goes through `redact_text`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: ("***" if is_secret_name(str(k)) and v not in (None, "") else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def redact_url(url: str) -> str:
    """A URL without user:password@ or query-string credentials."""
    if "://" not in url:
        return url
    proto, rest = url.split("://", 1)
    host, sep, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    path = path.split("?", 1)[0]
    return f"{proto}://{host}{sep}{path}"
