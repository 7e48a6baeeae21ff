"""The fsspec clients for s3:// and gs://, set up for one bounded retry layer (pipeline/retries.py).

s3:// — `S3SingleAttempt`: s3fs with its own retry loop off, and botocore making `client_attempts`
requests per call: 1 where selfsup's layer wraps the call (every `storage.*` function), more
where nothing of selfsup's does (Ray Train's checkpoint I/O through `storage.arrow_filesystem`).
gs:// — gcsfs's JSON-API `GCSFileSystem`, whose fixed retry loop is the layer, with per-request
timeouts (connect, and each read) instead of aiohttp's 5-minute total.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from s3fs import S3FileSystem

CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 15.0  # seconds a request may take to connect, and per read (s3fs's defaults)


class S3SingleAttempt(S3FileSystem):
    """s3fs with its retry loop off (a class attribute in s3fs, so copies unpickled in Ray workers keep it)."""

    retries = 1


def s3_filesystem(options: Optional[Mapping[str, Any]], client_attempts: int) -> Any:
    """An S3SingleAttempt from selfsup's options (`endpoint_url`, `region`, plus any s3fs option)."""
    opts = dict(options or {})
    out: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = dict(opts.pop("client_kwargs", {}) or {})
    endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["endpoint_url"] = endpoint
    region = opts.pop("region", None)
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        out["client_kwargs"] = client_kwargs
    config = dict(opts.pop("config_kwargs", {}) or {})
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": client_attempts})
    out["config_kwargs"] = config
    out.update(opts)
    return S3SingleAttempt(**out)


def gcs_filesystem(options: Optional[Mapping[str, Any]]) -> Any:
    """gcsfs's JSON-API filesystem (`gcsfs.core.GCSFileSystem`) from gcsfs options.

    Not `fsspec.filesystem("gs")`: gcsfs 2026 registers its experimental ExtendedGcsFileSystem
    there, which asks the gRPC Storage Control API for a bucket's layout before using it and waits
    up to a minute, on every call, where that API is unreachable or not permitted (an emulator, a
    least-privilege service account). selfsup writes whole objects and needs no zonal buckets.
    Raises ImportError when gcsfs is missing.
    """
    from gcsfs.core import GCSFileSystem

    opts = dict(options or {})
    if "requests_timeout" not in opts:
        import aiohttp

        # gcsfs hands this to aiohttp per request: aiohttp's default (5 minutes for the whole request)
        # would cut long uploads short and let a stalled connection hang for minutes
        opts["requests_timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                                         sock_read=READ_TIMEOUT)
    return GCSFileSystem(**opts)


def forget_clients() -> None:
    """Drop every cached storage client, so the next call makes new ones from the credentials then
    in the environment (fsspec caches one instance per class and options)."""
    S3SingleAttempt.clear_instance_cache()
    try:
        from gcsfs.core import GCSFileSystem
    except ImportError:
        return
    GCSFileSystem.clear_instance_cache()
