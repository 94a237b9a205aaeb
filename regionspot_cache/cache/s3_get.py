"""The GETs of a shard's objects on S3 through obstore (Rust's object_store), when it is installed.

s3fs spends about 4.5 ms of Python CPU per MB fetched, under the GIL the training loop reads with
(benchmarks/RESULTS.md, issue 23); obstore does the requests in Rust with the GIL released. Only
these ranged GETs of a shard's objects (``CacheLocation.fetch_dir``) go through it: listings,
commit records and writes stay with s3fs.

obstore is configured from what s3fs reads: botocore resolves the credentials (environment,
``AWS_PROFILE``, ``~/.aws``), the endpoint (``AWS_ENDPOINT_URL``, a profile's ``endpoint_url``)
and the region, and they are passed to obstore explicitly (object_store reads no profiles).
Whatever obstore cannot do as s3fs would (no credentials: anonymous access; fsspec's own S3
settings) and any failure but a missing object returns None: the caller fetches through s3fs,
which raises the one-line errors the storage layer makes of its failures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

log = logging.getLogger(__name__)

_STORES: dict[tuple, Any] = {}
_STORES_LOCK = threading.Lock()  # a shard cache's fetch threads start at once: one store, made once
# obstore's defaults retry for up to 3 minutes; a failing GET is redone through s3fs anyway.
_RETRY = {"max_retries": 3, "retry_timeout": timedelta(seconds=30)}
_CONFIG_VARS = ("AWS_", "FSSPEC_")


def _new_lock_in_child() -> None:
    global _STORES_LOCK  # a loader worker forked while a fetch thread held the lock would wait forever
    _STORES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _disabled() -> bool:
    """``RS_CACHE_S3_CLIENT=s3fs`` keeps the GETs in s3fs (the benchmarks compare the two)."""
    return os.environ.get("RS_CACHE_S3_CLIENT", "").lower() == "s3fs"


def s3_store(bucket: str) -> Any | None:
    """An obstore S3Store of ``bucket`` with s3fs's settings; None when obstore is not installed
    or the settings are ones only s3fs honours. One per process, bucket and configuration."""
    if _disabled():
        return None
    config = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CONFIG_VARS)))
    key = (os.getpid(), bucket, config)
    with _STORES_LOCK:
        if key not in _STORES:
            try:
                _STORES[key] = _new_store(bucket)
            except Exception as err:  # noqa: BLE001 - a configuration obstore cannot take: s3fs fetches
                log.debug("obstore not used for %s: %s", bucket, err)
                _STORES[key] = None
        return _STORES[key]


def _new_store(bucket: str) -> Any | None:
    try:
        from obstore.store import S3Store
    except ImportError:
        return None
    if any(name.startswith("FSSPEC_S3") for name in os.environ):  # fsspec's settings for s3fs alone
        return None
    import botocore.session

    session = botocore.session.Session()
    credentials = session.get_credentials()
    if credentials is None:  # anonymous: s3fs's own handling
        return None
    client = session.create_client("s3")  # resolves the endpoint and region as s3fs's client does
    endpoint, region = client.meta.endpoint_url, client.meta.region_name or "us-east-1"
    config: dict[str, Any] = {"region": region}
    if not endpoint.rstrip("/").endswith(".amazonaws.com"):  # an S3-compatible server
        config["endpoint"] = endpoint
    return S3Store(
        bucket,
        config=config,
        client_options={"allow_http": endpoint.startswith("http://")},
        retry_config=_RETRY,
        credential_provider=_Credentials(credentials),
    )


class _Credentials:
    """botocore's credentials (refreshed by botocore when temporary), asked again every few minutes."""

    def __init__(self, credentials: Any):
        self.credentials = credentials

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(timezone.utc) + timedelta(minutes=5),
        }


def get_parts(bucket: str, parts: Sequence[tuple[str, int, int]]) -> list[Any] | None:
    """The bytes of each ``(key under the bucket, start, end)``, fetched at once; a
    FileNotFoundError in place of a part whose object is gone. None: fetch them with s3fs."""
    store = s3_store(bucket)
    if store is None:
        return None
    try:
        asyncio.get_running_loop()
        return None  # inside an event loop (not ours): s3fs's sync wrapper copes
    except RuntimeError:
        pass
    try:
        return asyncio.run(_get_all(store, parts))
    except Exception as err:  # noqa: BLE001 - s3fs redoes the fetch and reports its failure
        log.debug("obstore GETs from %s failed, fetching with s3fs: %s", bucket, err)
        return None


async def _get_all(store: Any, parts: Sequence[tuple[str, int, int]]) -> list[Any]:
    return await asyncio.gather(*(_get(store, *part) for part in parts))


async def _get(store: Any, key: str, start: int, end: int) -> Any:
    import obstore
    from obstore.exceptions import NotFoundError

    try:  # obstore raises a missing object as FileNotFoundError (NotFoundError in some versions)
        if end <= start:  # an empty object: a zero-length range is an error to object_store
            return await (await obstore.get_async(store, key)).bytes_async()
        return await obstore.get_range_async(store, key, start=start, end=end)
    except (FileNotFoundError, NotFoundError) as err:
        return FileNotFoundError(str(err).splitlines()[0] if str(err) else key)
