"""Real GCS and Azure Blob servers for the tests, each its own process on loopback:
``gcp-storage-emulator`` (PyPI, a pure-Python GCS JSON API) and Azurite (npm, Microsoft's Azure
Storage emulator). The clients reach them the way their users point them at an emulator:
``STORAGE_EMULATOR_HOST`` for gcsfs, ``AZURE_STORAGE_CONNECTION_STRING`` for adlfs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
# Azurite's well-known development account (documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Buckets:
    """Fresh buckets, prefixes and cache URLs, for a server class with ``scheme`` (s3, gs or az),
    ``bucket`` (the session's) and ``filesystem()`` (a client of the tests' own)."""

    def new_bucket(self) -> str:
        name = f"rs-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name

    def new_prefix(self) -> str:
        """``bucket/<unique>``: where one test puts its caches."""
        return f"{self.bucket}/{uuid.uuid4().hex[:12]}"

    def url(self, relative: str = "") -> str:
        """A fresh cache URL in the session's bucket."""
        return f"{self.scheme}://{self.new_prefix()}{'/' + relative if relative else ''}"


@dataclass
class EmulatedStore(Buckets):
    """A running server: its URL scheme, the variables a user sets for it, a client of the tests' own."""

    scheme: str  # gs or az
    endpoint: str
    bucket: str = ""  # the session's bucket (GCS) or container (Azure)
    variables: dict[str, str] = field(default_factory=dict)

    def env(self, **override: str) -> dict[str, str]:
        return {**self.variables, **override}

    def filesystem(self):
        import fsspec

        if self.scheme == "gs":
            from gcsfs.core import GCSFileSystem  # the plain client: no gRPC bucket-layout lookup

            return GCSFileSystem(endpoint_url=self.endpoint, token="anon", skip_instance_cache=True)
        return fsspec.filesystem(
            "az", connection_string=self.variables["AZURE_STORAGE_CONNECTION_STRING"], skip_instance_cache=True
        )


def azurite_connection_string(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # an error document: the server is up
    except OSError:
        return False
    return True


def _require(module: str, package: str) -> None:
    """Skip (not hang waiting for a server no client can reach) where the test extra is not installed."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[test]')")


def _azurite() -> str:
    """Azurite's blob server: installed by the README's test command under .ci/node, else on PATH."""
    local = REPO / ".ci" / "node" / "node_modules" / ".bin" / "azurite-blob"
    found = str(local) if local.is_file() else shutil.which("azurite-blob")
    if not found:
        pytest.skip("Azurite is not installed (npm install --prefix .ci/node azurite, in the README's test command)")
    return found


def start_gcs(directory: Path) -> tuple[subprocess.Popen, EmulatedStore]:
    _require("gcp_storage_emulator", "gcp-storage-emulator")
    _require("gcsfs", "gcsfs")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gcp_storage_emulator",
        "-d",
        str(directory),
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    endpoint = f"http://127.0.0.1:{port}"
    # gcsfs's bucket-layout lookup goes over gRPC, which no emulator serves: off, as for any emulator.
    variables = {"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    return _spawn(command, directory), EmulatedStore("gs", endpoint, variables=variables)


def start_azurite(directory: Path) -> tuple[subprocess.Popen, EmulatedStore]:
    _require("adlfs", "adlfs")
    azurite, port = _azurite(), free_port()
    command = [azurite, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(directory), "--silent"]
    # No telemetry from a test run; the Azure SDK may be newer than the emulator's API version.
    command += ["--disableTelemetry", "--skipApiVersionCheck"]
    endpoint = f"http://127.0.0.1:{port}"
    variables = {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(endpoint)}
    return _spawn(command, directory), EmulatedStore("az", endpoint, variables=variables)


def _spawn(command: list[str], directory: Path) -> subprocess.Popen:
    with open(directory / "server.log", "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def serve(process: subprocess.Popen, store: EmulatedStore, directory: Path):
    """Wait until ``store`` answers and has a bucket, yield it, then kill the server."""

    def ready() -> bool:
        if not _answers(store.endpoint):
            return False
        try:
            store.bucket = store.new_bucket()
        except Exception:  # noqa: BLE001 - not ready yet
            return False
        return True

    try:
        try:
            wait_until(ready, f"the {store.scheme} emulator", must_live=[process], poll_s=0.2)
        except AssertionError as err:
            raise RuntimeError(f"{err}:\n{(directory / 'server.log').read_text()[-3000:]}") from None
        yield store
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
