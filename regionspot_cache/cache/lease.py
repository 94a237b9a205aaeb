"""One extraction per cache on object storage, without flock: a lease object (``.extract.lock``)
created with a conditional write (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure
``If-None-Match: *``; fsspec ``mode="create"``). Of two runs the second is refused. Its holder
renews it (``LEASE_SECONDS``); a lease no longer renewed, or whose holder on this machine is dead
(``kill -9``), is taken over by the next run."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from regionspot_cache.cache.storage import LEASE_SECONDS, CacheLocation
from regionspot_cache.errors import CacheBusyError, CacheStorageError
from regionspot_cache.runtime.files import process_alive

log = logging.getLogger(__name__)

LEASE_FILE = ".extract.lock"


@contextmanager
def extraction_lease(location: CacheLocation) -> Iterator[None]:
    """Held by the one extraction writing a cache on object storage (the flock of a local cache):
    a lease object created with a conditional write and renewed by a thread until released."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}
    _take_lease(location, holder)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_lease, args=(location, holder, stop), daemon=True, name="cache-lease")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            location.delete(LEASE_FILE)
        except CacheStorageError as err:  # it expires on its own
            log.warning("%s: lease not released: %s", location, err)


def _lease_bytes(holder: dict) -> bytes:
    return json.dumps({**holder, "expires": time.time() + LEASE_SECONDS}).encode()


def _take_lease(location: CacheLocation, holder: dict) -> None:
    if location.create_bytes(LEASE_FILE, _lease_bytes(holder)):
        return
    try:
        current = json.loads(location.read_bytes(LEASE_FILE))
    except FileNotFoundError:  # released in between
        current = {}
    except ValueError:
        current = {"expires": 0}
    if current and not _lease_stale(current):
        raise CacheBusyError(
            f"{location}: another rs-cache extract (pid {current.get('pid')} on {current.get('host')}) "
            "is writing this cache; wait for it to finish or stop it, then re-run to resume"
        )
    log.info("%s: taking over the lease of a run that is gone (%s)", location, current)
    location.delete(LEASE_FILE)
    if not location.create_bytes(LEASE_FILE, _lease_bytes(holder)):
        raise CacheBusyError(f"{location}: another rs-cache extract took the cache's lease just now; re-run to resume")


def _lease_stale(lease: dict) -> bool:
    """Expired, or held by a process of this machine that no longer exists (``kill -9``)."""
    if float(lease.get("expires", 0)) < time.time():
        return True
    return lease.get("host") == socket.gethostname() and not process_alive(int(lease.get("pid", -1)))


def _renew_lease(location: CacheLocation, holder: dict, stop: threading.Event) -> None:
    while not stop.wait(LEASE_SECONDS / 4):
        try:
            location.write_bytes(LEASE_FILE, _lease_bytes(holder))
        except CacheStorageError as err:
            log.warning("%s: lease not renewed: %s", location, err)
