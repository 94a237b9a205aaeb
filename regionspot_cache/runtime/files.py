"""Files: hashing, reading TOML, atomic writes (aside, then renamed) and the cleanup after killed writers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import tomllib

from regionspot_cache.errors import InputError, NonFiniteValueError


def sha256_file(path: Path | str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# How the bytes of each image file are digested at extraction (recorded in each shard's input.json),
# so that an image replaced under the same name can be found later (``rs-cache verify --images``).
# SHA-256: with the SHA instructions of current CPUs about 0.3 ms for a 150 kB JPEG, twice as fast
# as BLAKE2b there and about 5% of decoding it (measured in the README's "What each command checks").
CONTENT_DIGEST = "sha256"


def content_digest(data: bytes) -> str:
    """The ``CONTENT_DIGEST`` of a file's bytes, as hex."""
    return hashlib.sha256(data).hexdigest()


def file_content_digest(path: Path | str) -> str | None:
    """``content_digest`` of the file at ``path``; None when it cannot be read (then decoding the
    image names the problem)."""
    try:
        return content_digest(Path(path).read_bytes())
    except OSError:
        return None


def read_toml(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """Parse a TOML file; a missing or invalid file raises ``error`` naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid TOML: {err}") from None


TEMP_PREFIX = ".tmp-"


def temp_sibling(final: Path) -> Path:
    """Where ``final`` is written before its rename: ``.tmp-<name>-<pid>-<token>`` beside it.
    Hidden, so never read as data; the pid lets a later run remove it once its writer is dead;
    the token keeps two writers in one process (threads) apart."""
    return final.with_name(f"{TEMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


_UMASK = os.umask(0o022)  # read once, at import, and restored at once: os.umask can only be read by setting it
os.umask(_UMASK)


@contextmanager
def atomic_path(final: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` for the caller (or a library such as
    ``pq.write_table`` / safetensors ``save_file``) to write a file or a directory at; on success it
    is synced to disk and renamed to ``final``, so readers see the old one or the new one, never a
    partial one. On any error the temporary is removed and ``final`` is left as it was.

    ``durable=False`` skips the syncs: for copies no later process trusts (a shard fetched into a
    directory emptied when its owner starts), where a crash loses nothing and the syncs cost more
    than the fetch (they wait for the disk, and make it write what is deleted moments later)."""
    tmp = temp_sibling(final)
    try:
        yield tmp
        if tmp.is_file():  # safetensors writes 0600: a head would be unreadable to others beside its 0644 JSON
            os.chmod(tmp, 0o666 & ~_UMASK)
        if durable:
            fsync_tree(tmp)
        os.replace(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    if durable:
        fsync_dir(final.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write aside then rename, so readers see the old file or the new one, never a partial one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_text(data: Any, path: Path | str, indent: int | None = None) -> str:
    """``data`` as strict JSON: NaN and Infinity, which ``json.dumps`` writes by default and no
    strict parser reads, are refused with an error naming the file instead of being written."""
    try:
        return json.dumps(data, indent=indent, allow_nan=False)
    except ValueError as err:
        raise NonFiniteValueError(f"{path}: not written: {err} (a NaN or infinite value; JSON cannot hold it)") from None


def write_json(path: Path | str, data: Any, indent: int | None = None) -> Path:
    """Every JSON file we write goes through here: strict JSON (see ``json_text``), written aside
    and renamed, so a refused or interrupted write leaves the previous file as it was."""
    path = Path(path)
    text = json_text(data, path, indent)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def remove_abandoned_temps(directory: Path, final_names: str, prefix: str = TEMP_PREFIX) -> None:
    """Remove what killed writers left in ``directory``: ``temp_sibling``s of finals whose name
    matches the regular expression ``final_names``, when no process has their pid any more (and
    other entries named ``<prefix><final name>-<pid>-...`` the same way)."""
    pattern = re.compile(rf"{re.escape(prefix)}(?:{final_names})-(\d+)(?:-.*)?")
    for entry in directory.glob(f"{prefix}*"):
        match = pattern.fullmatch(entry.name)
        if match and not process_alive(int(match[1])):
            remove_path(entry)


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and directory under ``path``, to disk."""
    if not path.is_dir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    directories = [path]
    for child in path.rglob("*"):
        if child.is_dir():
            directories.append(child)
        elif child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in directories:  # after the files: their entries are then final
        fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine): temp files named after a dead writer's
    pid are leftovers of a kill and can go."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable(path: Path, what: str, directory: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a directory where a file goes (or
    the reverse), a path under a file, or under a directory this process may not write to."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise InputError(
            f"{path}: {what} is {'a file' if directory else 'a directory'}; expected "
            f"{'a directory' if directory else 'a file'} path"
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{path}: cannot write {what}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write {what}: {parent} is not writable")
