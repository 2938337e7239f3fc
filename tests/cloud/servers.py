"""Storage that a test can take offline and bring back with its data: a real outage, for three backends.

``local`` is a folder, ``s3`` a moto server, ``gcs`` a gcp-storage-emulator, the two servers on
127.0.0.1 in this process. Import the fixture into a test module (``from tests.cloud.servers import backend_fixture``;
tests ask for it as ``backend``), hand ``backend.uri`` to the code under test and run a subprocess with
``{**os.environ, **backend.env}``.

``stop()``: the server closes its listening socket, so clients get "connection refused" at once (the
local folder is moved aside and a regular file put at its path). ``start()``: the server listens again
on the same port, every object still there: moto keeps its state in process-global backends, the
emulator keeps its objects in a data directory on disk.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import boto3
import pytest
from gcp_storage_emulator.server import Server as EmulatorServer
from gcp_storage_emulator.server import create_server
from moto.server import ThreadedMotoServer

from tests.cloud.s3_server import free_port, isolate_aws_env

BACKENDS = ("local", "s3", "gcs")
HOST = "127.0.0.1"
PREFIX = "runs"  # every URI names a folder or prefix below the storage root
_AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
)


class Backend(Protocol):
    name: str  # "local" | "s3" | "gcs"
    uri: str  # "/abs/path", "s3://bucket/prefix" or "gs://bucket/prefix"; holds no objects when handed out
    env: dict[str, str]  # what a subprocess needs to reach it (endpoint, fake credentials); empty for local

    def stop(self) -> None:
        """Outage: reads and writes fail (connection refused; an OSError for local). Idempotent."""

    def start(self) -> None:
        """Back on the same port or path with every object written before ``stop()``. Idempotent."""

    def close(self) -> None:
        """Stop for good and free what the backend holds."""


class LocalBackend:
    """A folder below a "mount point"; the outage replaces the mount point with a regular file.

    Root ignores permissions, so a file in the way is what makes every access fail, even ``mkdir -p``.
    """

    name = "local"

    def __init__(self, tmp_dir: Path) -> None:
        self.mount = tmp_dir / "mnt"
        self._aside = tmp_dir / "mnt.offline"
        (self.mount / PREFIX).mkdir(parents=True)
        self.uri = str((self.mount / PREFIX).resolve())
        self.env: dict[str, str] = {}

    def stop(self) -> None:
        if not self._aside.exists():
            self.mount.rename(self._aside)
            self.mount.write_bytes(b"storage offline (tests/cloud/servers.py)\n")

    def start(self) -> None:
        if self._aside.exists():
            self.mount.unlink()
            self._aside.rename(self.mount)

    def close(self) -> None:
        self.start()


class S3Backend:
    """A moto S3 server with a bucket of its own; its state lives in moto's process-global backends."""

    name = "s3"

    def __init__(self, tmp_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.bucket = f"evorl-{uuid.uuid4().hex[:12]}"
        self.uri = f"s3://{self.bucket}/{PREFIX}"
        self._aws_dir = str(tmp_dir / "aws")
        with pytest.MonkeyPatch.context() as scratch:  # the variables exactly as isolate_aws_env sets them
            isolate_aws_env(scratch, self._aws_dir)
            self.env = {name: os.environ[name] for name in _AWS_VARS} | {"AWS_ENDPOINT_URL": self.endpoint}
        self._server: ThreadedMotoServer | None = None
        self.start()
        self._client().create_bucket(Bucket=self.bucket)

    def _client(self) -> Any:
        with pytest.MonkeyPatch.context() as scratch:
            isolate_aws_env(scratch, self._aws_dir)
            return boto3.session.Session().client("s3", endpoint_url=self.endpoint)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # werkzeug closes the listening socket when serve_forever returns
            self._server = None

    def start(self) -> None:
        if self._server is None:
            wait_until_free(self.port)  # a failed bind in moto's thread would hang start() forever
            self._server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
            self._server.start()

    def close(self) -> None:
        """Delete the bucket (moto would keep its objects in memory for the whole session), then stop."""
        self.start()
        client = self._client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=self.bucket)
        self.stop()


class GCSBackend:
    """A gcp-storage-emulator keeping its objects on disk (``in_memory=False``), so a new server finds them."""

    name = "gcs"

    def __init__(self, tmp_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.bucket = f"evorl-{uuid.uuid4().hex[:12]}"
        self.uri = f"gs://{self.bucket}/{PREFIX}"
        self.env = {"STORAGE_EMULATOR_HOST": self.endpoint}
        self.data_dir = str((tmp_dir / "gcs-data").resolve())
        self._server: EmulatorServer | None = None
        self._start(default_bucket=self.bucket)

    def _start(self, default_bucket: str | None) -> None:
        wait_until_free(self.port)  # a failed bind in the emulator's thread would hang start() forever
        self._server = create_server(
            HOST, self.port, in_memory=False, default_bucket=default_bucket, data_dir=self.data_dir
        )
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # shutdown() and server_close(): the port refuses connections on return
            self._server = None

    def start(self) -> None:
        if self._server is None:
            self._start(default_bucket=None)  # the bucket is in data_dir already

    def close(self) -> None:
        self.stop()


def open_backend(name: str, tmp_dir: Path) -> Backend:
    """A running backend of kind ``name`` with an empty location, keeping its files under ``tmp_dir``."""
    kinds: dict[str, type[LocalBackend] | type[S3Backend] | type[GCSBackend]] = {
        "local": LocalBackend,
        "s3": S3Backend,
        "gcs": GCSBackend,
    }
    return kinds[name](tmp_dir)


def wait_until_free(port: int, timeout: float = 10.0) -> None:
    """Return once a server could bind ``port`` (with SO_REUSEADDR, as both servers do)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} is still in use after {timeout:g}s") from None
        time.sleep(0.05)


@pytest.fixture(name="backend", params=BACKENDS)
def backend_fixture(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    """A running backend of each kind, empty, with its ``env`` set in this process (other cloud settings cleared).

    A fresh server per test (it starts in milliseconds), so a test may leave it stopped.
    """
    isolate_aws_env(monkeypatch, str(tmp_path / "aws"))  # no real credentials or profile, whatever the backend
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    made = open_backend(request.param, tmp_path)
    try:
        for key, value in made.env.items():
            monkeypatch.setenv(key, value)
        yield made
    finally:
        made.close()
