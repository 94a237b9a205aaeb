"""Where a cache lives: a local directory, or a prefix on object storage (``s3://``, ``gs://``, ``az://``).

A ``CacheLocation`` is parsed once from what the user gave (a path or a URL) and is the one way the
cache's writer and reader reach their files. A local path (or ``file://``) keeps the POSIX layout
and its guarantees: shards written aside and renamed, extractions kept apart by ``flock``.

Object storage has neither rename nor flock, so there:

* A shard is staged in a local temporary directory, uploaded file by file, and made visible by
  its ``checksums.json``, uploaded last: the commit record. ``committed_shards`` lists only
  shards that have one, so the reader never reads a half-uploaded shard, and a resumed run
  deletes what a killed writer left under the shard's prefix and uploads it again.
* One writer per shard: the runner hands each pending shard to exactly one task (in-process or
  one dask task), so two writers of one shard exist only if two extractions run at once.
* One extraction per cache: instead of flock, a lease object created with a conditional write
  (``create_bytes``; the lease itself is in ``lease.py``).

Credentials and endpoints are configured the way fsspec's backends (s3fs, gcsfs, adlfs) read
them: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_PROFILE`` and ``~/.aws`` for S3 and S3-compatible servers; Google's application default
credentials and ``STORAGE_EMULATOR_HOST`` for GCS; ``AZURE_STORAGE_CONNECTION_STRING`` or
``AZURE_STORAGE_ACCOUNT_NAME`` with a key, SAS token or service principal for Azure. On S3 the
GETs of a fetched shard go through obstore when it is installed, with the same settings (``s3_get``).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

from regionspot_cache.cache.store_errors import store_failures
from regionspot_cache.errors import CacheStorageError
from regionspot_cache.runtime.files import atomic_path, atomic_write_bytes

REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "memory")
LEASE_SECONDS = 120.0  # a lease not renewed for this long belongs to a dead run
COMMIT_RECORD = "checksums.json"  # written last: a shard without it is not committed
SHARDS_DIR = "shards"
# Environment variables the clients read their configuration from.
_CONFIG_VARS = ("AWS_", "GOOGLE_", "GCS", "AZURE_", "STORAGE_EMULATOR_HOST", "FSSPEC_")
_FILESYSTEMS: dict[tuple, Any] = {}
DOWNLOAD_PART = 16 << 20  # bytes per ranged GET when a shard is fetched (each GET costs about 1.5 ms of CPU)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}"


@dataclass(frozen=True)
class CacheLocation:
    """A cache's root: ``local`` for a directory, else ``url`` (``scheme://bucket/prefix``)."""

    url: str
    local: Path | None = None

    @classmethod
    def parse(cls, where: "CacheLocation | Path | str") -> "CacheLocation":
        """From a path or a URL. A URL that went through ``pathlib.Path`` (typer options are
        Paths) lost one slash, ``s3:/bucket/prefix``: it is read as the URL it was."""
        if isinstance(where, CacheLocation):
            return where
        text = os.fspath(where)
        scheme, sep, rest = text.partition(":/")
        if sep and scheme == "file":
            return cls.parse("/" + rest.lstrip("/"))
        if sep and scheme in REMOTE_SCHEMES:
            rest = posixpath.normpath(rest.lstrip("/")).strip("/")
            if not rest or rest == ".":
                raise CacheStorageError(f"{text}: a cache URL needs a bucket (e.g. {scheme}://bucket/prefix)")
            return cls(f"{scheme}://{rest}")
        return cls(text, Path(text))

    @property
    def remote(self) -> bool:
        return self.local is None

    def __str__(self) -> str:
        return self.url

    @property
    def protocol(self) -> str:
        return self.url.partition("://")[0]

    @property
    def key(self) -> str:
        """``bucket/prefix``: the root as the filesystem names it."""
        return self.url.partition("://")[2]

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def fs(self) -> Any:
        return self._filesystem(asynchronous=False)

    def _filesystem(self, asynchronous: bool) -> Any:
        """The fsspec filesystem: one per protocol, process and configuration in the environment
        (fsspec's own instance cache would keep using the endpoint and keys it first saw)."""
        import fsspec

        config = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CONFIG_VARS)))
        key = (self.protocol, os.getpid(), asynchronous, config)
        try:
            if key not in _FILESYSTEMS:
                cls = fsspec.get_filesystem_class(self.protocol)
                options = {"asynchronous": True} if asynchronous and cls.async_impl else {}
                _FILESYSTEMS[key] = fsspec.filesystem(self.protocol, skip_instance_cache=True, **options)
            return _FILESYSTEMS[key]
        except ImportError as err:
            raise CacheStorageError(
                f"{self.url}: no client for {self.protocol}:// installed ({err}); "
                "install regionspot-cache[s3] (s3fs), [gcs] (gcsfs) or [azure] (adlfs)"
            ) from None

    def child(self, relative: str) -> "CacheLocation":
        """A location under (or beside, with ``..``) this one: proposals and view caches."""
        if self.local is not None:
            return CacheLocation.parse((self.local / relative).resolve())
        return CacheLocation(f"{self.protocol}://{posixpath.normpath(posixpath.join(self.key, relative))}")

    def path(self, relative: str) -> str:
        """The object key (remote) or the file path (local) of ``relative``."""
        return str(self.local / relative) if self.local is not None else posixpath.join(self.key, relative)

    # Small objects: cache.json, manifests, vocabularies, the lease.

    def read_bytes(self, relative: str) -> bytes:
        """The object's bytes; FileNotFoundError when it is not there."""
        if self.local is not None:
            return (self.local / relative).read_bytes()
        with self.requests(f"read {relative}"):
            return self.fs.cat_file(self.path(relative))

    def read_table(self, relative: str) -> Any:
        """A parquet file (manifests, vocabularies) as a pyarrow Table."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.local is not None:
            return pq.read_table(self.local / relative)
        return pq.read_table(pa.BufferReader(self.read_bytes(relative)))

    def write_bytes(self, relative: str, data: bytes) -> None:
        if self.local is not None:
            (self.local / relative).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.local / relative, data)
            return
        with self.requests(f"write {relative}"):
            self.fs.pipe_file(self.path(relative), data)

    def create_bytes(self, relative: str, data: bytes) -> bool:
        """Write only if no object is there (a conditional write); False when one was."""
        with self.requests(f"create {relative}"):
            try:
                self.fs.pipe_file(self.path(relative), data, mode="create")
            except (FileExistsError, OSError) as err:
                if isinstance(err, FileExistsError) or "pre-condition" in str(err) or "precondition" in str(err).lower():
                    return False
                raise
        return True

    def exists(self, relative: str) -> bool:
        if self.local is not None:
            return (self.local / relative).exists()
        with self.requests(f"look up {relative}"):
            return bool(self.fs.exists(self.path(relative)))

    def delete(self, relative: str) -> None:
        """Remove an object, or every object under a prefix, if there."""
        with self.requests(f"delete {relative}"):
            paths = self.fs.find(self.path(relative))
            if self.fs.exists(self.path(relative)) and self.path(relative) not in paths:
                paths.append(self.path(relative))
            if paths:
                self.fs.rm(paths)

    def read_many(self, relatives: list[str]) -> list[bytes | None]:
        """The bytes of each object (None where there is none), fetched concurrently when remote."""
        if self.local is not None:
            return [(self.local / r).read_bytes() if (self.local / r).is_file() else None for r in relatives]
        if not relatives:
            return []
        with self.requests(f"read {len(relatives)} objects"):
            found = self.fs.cat([self.path(r) for r in relatives], on_error="return")
        return [None if isinstance(found.get(self.path(r)), Exception) else found.get(self.path(r)) for r in relatives]

    def subdirectories(self, relative: str) -> list[str]:
        """Names of the directories (prefixes) directly under ``relative``: nested caches."""
        if self.local is not None:
            directory = self.local / relative
            return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        with self.requests(f"list {relative}"):
            try:
                found = self.fs.ls(self.path(relative), detail=True, refresh=True)
            except FileNotFoundError:
                return []
        return sorted(posixpath.basename(info["name"].rstrip("/")) for info in found if info.get("type") == "directory")

    def names(self, relative: str, suffix: str) -> list[str]:
        """Stems of the objects ``relative/<stem><suffix>`` (one level)."""
        if self.local is not None:
            directory = self.local / relative
            return sorted(p.name.removesuffix(suffix) for p in directory.glob(f"*{suffix}")) if directory.is_dir() else []
        with self.requests(f"list {relative}"):
            found = self.fs.glob(self.path(f"{relative}/*{suffix}"))
        return sorted(posixpath.basename(p).removesuffix(suffix) for p in found)

    def bytes_stored(self, except_under: tuple[str, ...] = ()) -> int:
        """Bytes of the objects under the root, but those under the prefixes ``except_under``."""
        with self.requests("list"):
            sizes = self.fs.find(self.key, detail=True)
        skipped = tuple(self.path(p) + "/" for p in except_under)
        return sum(int(info.get("size") or 0) for path, info in sizes.items() if not path.startswith(skipped))

    def shard_bytes(self) -> dict[int, int]:
        """Bytes stored of each committed or uncommitted shard, by id (one listing)."""
        return {shard: sum(objects.values()) for shard, objects in self.shard_objects().items()}

    def shard_objects(self) -> dict[int, dict[str, int]]:
        """The objects of each committed or uncommitted shard (their paths under the shard's
        prefix, with their bytes), by id, from one listing: what ``fetch_shard`` GETs."""
        with self.requests(f"list {SHARDS_DIR}"):
            sizes = self.fs.find(self.path(SHARDS_DIR), detail=True)
        found: dict[int, dict[str, int]] = {}
        prefix = self.path(SHARDS_DIR) + "/"
        for key, info in sizes.items():
            name, _, rest = key.removeprefix(prefix).partition("/")
            if name.isdigit() and rest:
                found.setdefault(int(name), {})[rest] = int(info.get("size") or 0)
        return found

    # Shards.

    def committed_shards(self, shards_dir: str) -> list[int]:
        """Ids of the shards with a commit record (remote) or a committed directory (local)."""
        if self.local is not None:
            directory = self.local / shards_dir
            return (
                sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()) if directory.is_dir() else []
            )
        with self.requests(f"list {shards_dir}"):
            found = self.fs.glob(self.path(f"{shards_dir}/*/{COMMIT_RECORD}"))
        names = (posixpath.basename(posixpath.dirname(p)) for p in found)
        return sorted(int(name) for name in names if name.isdigit())

    def fetch_shard(self, shard_id: int, local_dir: Path, objects: dict[str, int] | None = None) -> Path:
        """Copy committed shard ``shard_id`` to ``local_dir/<NNNNNN>`` and return that directory:
        fetched aside and renamed, so a directory there is always a whole shard. A shard that is
        not committed (no commit record) is a FileNotFoundError.

        ``objects``: the shard's objects as ``shard_objects`` listed them; with its commit record
        among them, the shard is fetched by GETs alone (no lookup of the record, no listing of the
        shard: two requests of the dozen a shard costs). The listing must be newer than the
        shard's commit: one taken before training starts, as ``ShardCache`` takes it."""
        relative, objects = self._committed_shard(shard_id, objects)
        final = Path(local_dir) / shard_name(shard_id)
        if final.is_dir():
            return final
        with atomic_path(final, durable=False) as tmp:  # a copy for this process's life (see the callers)
            self.fetch_dir(relative, tmp, objects)
        return final

    def shard_in_memory(self, shard_id: int, objects: dict[str, int] | None = None) -> dict[str, Any]:
        """``fetch_shard`` into memory: each of the committed shard's files (its path within the
        shard) to its bytes, with no local file written."""
        relative, objects = self._committed_shard(shard_id, objects)
        if self.local is not None:
            root = self.local / relative
            return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        downloaded = self._download(relative, objects)
        return {name: pieces[0] if len(pieces) == 1 else b"".join(pieces) for name, pieces in downloaded.items()}

    def _committed_shard(self, shard_id: int, objects: dict[str, int] | None) -> tuple[str, dict[str, int] | None]:
        """(the shard's path, ``objects`` when they can be trusted): a shard that is not committed
        is a FileNotFoundError."""
        relative = f"{SHARDS_DIR}/{shard_name(shard_id)}"
        if objects is None or COMMIT_RECORD not in objects:  # not listed, or listed before its commit
            if not self.exists(f"{relative}/{COMMIT_RECORD}"):
                raise FileNotFoundError(f"{self.url}: shard {shard_id} is not committed")
            objects = None
        return relative, objects

    def uncommit_shard(self, shard_id: int) -> None:
        """Remove a committed shard: its commit record first, so no reader sees half of it."""
        relative = f"{SHARDS_DIR}/{shard_name(shard_id)}"
        self.delete(f"{relative}/{COMMIT_RECORD}")
        self.delete(relative)

    def publish_dir(self, staged: Path, relative: str, record: str = COMMIT_RECORD) -> None:
        """Upload a staged directory (a shard; a region index) to ``relative``: first remove what a
        killed writer left there, then every file but ``record``, then ``record`` (the commit)."""
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        last = [p for p in files if p.relative_to(staged).as_posix() == record]
        if not last:
            raise ValueError(f"{staged}: no {record} to commit the directory with")
        self.delete(relative)
        with self.requests(f"upload {relative}"):
            rest = [p for p in files if p not in last]
            self.fs.put([str(p) for p in rest], [self.path(f"{relative}/{p.relative_to(staged).as_posix()}") for p in rest])
            self.fs.put_file(str(last[0]), self.path(f"{relative}/{record}"))

    def copy_dir(self, source: str, target: str) -> None:
        """Copy every object under ``source`` to ``target`` on the store itself (no download), the
        commit record last: a copy interrupted midway is not a committed shard."""
        with self.requests(f"copy {source} to {target}"):
            keys = sorted(self.fs.find(self.path(source)), key=lambda k: posixpath.basename(k) == COMMIT_RECORD)
            prefix = self.path(source) + "/"
            for key in keys:
                self.fs.copy(key, self.path(f"{target}/{key.removeprefix(prefix)}"))

    def fetch_dir(self, relative: str, local_dir: Path, objects: dict[str, int] | None = None) -> Path:
        """Copy every object under ``relative`` into ``local_dir`` (same relative layout); remote,
        ``objects`` (paths under ``relative`` and their bytes) spares the listing."""
        local_dir.mkdir(parents=True, exist_ok=True)
        if self.local is not None:
            import shutil

            shutil.copytree(self.local / relative, local_dir, dirs_exist_ok=True)
            return local_dir
        chunks = self._download(relative, objects)
        targets = {name: local_dir / name for name in chunks}
        for directory in sorted({target.parent for target in targets.values()}):  # each made once
            directory.mkdir(parents=True, exist_ok=True)
        for name, pieces in chunks.items():
            with open(targets[name], "wb") as handle:  # part by part: joining them first copied every byte once more
                handle.writelines(pieces)
        return local_dir

    def _download(self, relative: str, objects: dict[str, int] | None) -> dict[str, list[Any]]:
        """Each object under ``relative`` (remote; ``objects`` as in ``fetch_dir``): its path
        under ``relative`` to its bytes, in parts."""
        with self.requests(f"download {relative}"):
            prefix = self.path(relative) + "/"
            if objects is None:
                sizes = {key: int(info.get("size") or 0) for key, info in self.fs.find(self.path(relative), detail=True).items()}
            else:
                sizes = {prefix + name: size for name, size in objects.items()}
            parts = [
                (key, start, min(start + DOWNLOAD_PART, size))
                for key, size in sizes.items()
                for start in range(0, max(size, 1), DOWNLOAD_PART)
            ]
            # Ranged GETs of every object's parts at once: a shard is a few large objects, and
            # one stream per object would leave the link mostly idle. On S3 through obstore when
            # it is installed (the GIL released during the GETs), else or on its failure s3fs.
            data = self._get_parts(parts)
        chunks: dict[str, list[Any]] = {key.removeprefix(prefix): [] for key in sizes}
        for (key, start, end), chunk in zip(parts, data):
            if isinstance(chunk, Exception) and not isinstance(chunk, FileNotFoundError):
                with self.requests(f"download {key}"):
                    raise chunk
            if isinstance(chunk, Exception) or len(chunk) != end - start:  # gone or changed since listed
                raise FileNotFoundError(f"{self.url}: {key.removeprefix(prefix)} of {relative} is gone or changed")
            chunks[key.removeprefix(prefix)].append(chunk)
        return chunks

    def _get_parts(self, parts: list[tuple[str, int, int]]) -> list[Any]:
        if self.family == "s3":
            from regionspot_cache.cache.s3_get import get_parts

            found = get_parts(self.bucket, [(key.partition("/")[2], start, end) for key, start, end in parts])
            if found is not None:
                return found
        return self.fs.cat_ranges([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])

    def requests(self, what: str) -> ContextManager[None]:
        """Failures of the store itself as one CacheStorageError naming the URL (``store_errors``);
        a missing object stays a FileNotFoundError, a missing bucket not."""
        return store_failures(self, what)

    @property
    def family(self) -> str:
        """``s3``, ``gs`` or ``az`` (``gcs`` and ``abfs`` are other names of the last two)."""
        return {"gcs": "gs", "abfs": "az"}.get(self.protocol, self.protocol)

    @property
    def bucket_word(self) -> str:
        return "container" if self.family == "az" else "bucket"
