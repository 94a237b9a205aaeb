"""What a failure of the object store means to the user: one ``CacheStorageError`` naming the
cache's URL, what was being done, and what to check (the endpoint, the credentials, the bucket),
in the words of the store's own configuration (``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``,
...). A missing object stays a FileNotFoundError: the caller knows what its absence means."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from regionspot_cache.errors import CacheStorageError

if TYPE_CHECKING:
    from regionspot_cache.cache.storage import CacheLocation

# What a user sets for each store: (its endpoint, its credentials), named in error messages.
_HINTS = {
    "s3": ("the endpoint (AWS_ENDPOINT_URL)", "AWS_ACCESS_KEY_ID, AWS_PROFILE, ..."),
    "gs": ("the endpoint (STORAGE_EMULATOR_HOST for an emulator)", "GOOGLE_APPLICATION_CREDENTIALS, gcloud auth ..."),
    "az": (
        "the account (AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME)",
        "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_KEY, ...",
    ),
}


@contextmanager
def store_failures(location: "CacheLocation", what: str) -> Iterator[None]:
    """Failures of the store itself, raised inside, as one CacheStorageError naming the URL; a
    missing object stays a FileNotFoundError, a missing bucket does not."""
    try:
        yield
    except FileNotFoundError as err:
        if _bucket_missing(location, err):
            raise _no_bucket(location, what) from None
        raise
    except PermissionError as err:
        raise _denied(location, what, err) from None
    except CacheStorageError:
        raise
    except Exception as err:
        if not _is_store_failure(err):
            raise
        if _status(err) in (401, 403) or str(err).startswith("Forbidden"):  # Azure's and gcsfs's refusals
            raise _denied(location, what, err) from None
        if _status(err) == 404 and _bucket_missing(location, err):  # Azure: ContainerNotFound on a write
            raise _no_bucket(location, what) from None
        raise CacheStorageError(
            f"{location.url}: the object store failed ({what}): {type(err).__name__}: {_first_line(err)}; "
            f"check {_hint(location, 0)}, the network and the {location.bucket_word}"
        ) from None


def _bucket_missing(location: "CacheLocation", err: Exception) -> bool:
    """s3fs says so in its message (S3's own words, or its error code; a missing object's message is
    its path, which may hold the word "bucket" too); gcsfs and adlfs raise the same error for a
    missing object and a missing bucket, so the bucket is looked up (on this error path only)."""
    if location.family == "s3":
        said = str(err).lower()
        return "specified bucket does not exist" in said or "nosuchbucket" in said
    if location.family not in _HINTS:  # memory://: no buckets
        return False
    try:
        return not location.fs.exists(location.bucket)
    except Exception:  # noqa: BLE001 - cannot tell: the original error stands
        return False


def _hint(location: "CacheLocation", which: int) -> str:
    return _HINTS[location.family][which] if location.family in _HINTS else ("the URL", "the credentials")[which]


def _no_bucket(location: "CacheLocation", what: str) -> CacheStorageError:
    return CacheStorageError(f"{location.url}: {location.bucket_word} {location.bucket!r} does not exist ({what})")


def _denied(location: "CacheLocation", what: str, err: Exception) -> CacheStorageError:
    return CacheStorageError(
        f"{location.url}: access denied ({what}): {_first_line(err)}; check the credentials "
        f"({_hint(location, 1)}) and their rights on the {location.bucket_word}"
    )


def _status(err: Exception) -> int | None:
    """The HTTP status of an Azure (``status_code``) or gcsfs (``code``) error, if it has one."""
    status = getattr(err, "status_code", None) or getattr(err, "code", None)
    return status if isinstance(status, int) else None


def _first_line(err: Exception) -> str:
    """Azure's errors carry the whole XML error document: its first line says what happened."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def _is_store_failure(err: Exception) -> bool:
    """Errors of the storage clients (OSError, botocore's and aiohttp's), not bugs of ours."""
    if isinstance(err, OSError):
        return True
    module = type(err).__module__ or ""
    return module.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "google", "azure")
