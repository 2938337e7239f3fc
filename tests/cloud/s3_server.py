"""A real S3 server for tests: moto in server mode on 127.0.0.1, fake credentials, one bucket.

Import the fixtures into a test module: ``from tests.cloud.s3_server import S3Server, s3_server, s3_env``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pytest

FAKE_KEY_ID = "testing"
FAKE_SECRET = "testing-secret-do-not-print"
BUCKET = "evorl-test"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_dir: str) -> None:
    """Fake credentials only, no profile, config file or instance metadata from the machine running the tests."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", f"{tmp_dir}/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", f"{tmp_dir}/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on a free local port with one bucket; fake credentials set for the module."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            isolate_aws_env(monkeypatch, str(tmp_path_factory.mktemp("aws")))
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield S3Server(endpoint, BUCKET)
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with ``AWS_ENDPOINT_URL`` pointing at it for this test only."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    return s3_server
