"""The outage fixture works: each backend is empty, fails while stopped, and comes back with its objects."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud.gcs import GCSStorage
from cloud.s3 import S3Storage
from cloud.storage import Storage, StorageError, open_storage
from tests.cloud.servers import Backend, LocalBackend, backend_fixture  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]
BIG = bytes(range(256)) * (9 * 1024 * 4)  # 9 MiB: a multipart upload on GCS


def quick(backend: Backend) -> Storage:
    """Storage that gives up on a dead server within seconds; the defaults retry for 5-15 s (S3) or 96 s (GCS)."""
    if backend.name == "s3":
        return S3Storage.from_uri(backend.uri, max_attempts=1, connect_timeout=1, read_timeout=5)
    if backend.name == "gcs":
        return GCSStorage.from_uri(backend.uri, timeout=2, deadline=3)
    return open_storage(backend.uri)


def test_a_fresh_backend_is_empty_and_reachable_in_process(backend: Backend) -> None:
    storage = open_storage(backend.uri)
    assert storage.list("") == []
    storage.write("run/a.bin", b"a")
    assert storage.read("run/a.bin") == b"a"
    assert storage.list("") == ["run/a.bin"]
    assert all(os.environ[key] == value for key, value in backend.env.items())
    expected = {
        "local": set(),
        "s3": {
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_EC2_METADATA_DISABLED",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
        },
        "gcs": {"STORAGE_EMULATOR_HOST"},
    }
    assert set(backend.env) == expected[backend.name]


def test_a_stopped_backend_fails_fast_and_comes_back_with_its_objects(backend: Backend) -> None:
    before = open_storage(backend.uri)  # a client made before the outage, default settings
    before.write("run/a.bin", b"a")
    before.write("run/big.bin", BIG)
    storage = quick(backend)

    backend.stop()
    backend.stop()  # idempotent
    start = time.monotonic()
    with pytest.raises(StorageError):
        storage.write("run/b.bin", b"b")
    with pytest.raises(NotADirectoryError if backend.name == "local" else StorageError):
        storage.read("run/a.bin")  # LocalStorage.read does not wrap OSError
    assert time.monotonic() - start < 8

    backend.start()
    backend.start()  # idempotent
    assert before.read("run/a.bin") == b"a" and before.read("run/big.bin") == BIG
    storage.write("run/b.bin", b"b")
    assert open_storage(backend.uri).list("run") == ["run/a.bin", "run/b.bin", "run/big.bin"]


def test_exists_and_list_notice_the_outage_except_on_local(backend: Backend) -> None:
    """A local outage is silent for ``exists`` and ``list``: they answer "nothing there" instead of failing."""
    storage = quick(backend)
    storage.write("run/a.bin", b"a")
    backend.stop()
    if backend.name == "local":
        assert not storage.exists("run/a.bin") and storage.list("run") == []
    else:
        for call in (lambda: storage.exists("run/a.bin"), lambda: storage.list("run")):
            with pytest.raises(StorageError, match="cannot reach"):
                call()
    backend.start()
    assert storage.exists("run/a.bin") and storage.list("run") == ["run/a.bin"]


def test_a_subprocess_reaches_the_backend_with_env_alone(backend: Backend) -> None:
    open_storage(backend.uri).write("run/a.bin", b"from the test")
    cloud_vars = ("AWS_", "STORAGE_EMULATOR_HOST", "GOOGLE_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(cloud_vars)} | backend.env
    script = (
        "import sys; from cloud.storage import open_storage; s = open_storage(sys.argv[1]); "
        "s.write('run/b.bin', s.read('run/a.bin') + b' and back')"
    )
    subprocess.run([sys.executable, "-c", script, backend.uri], env=env, cwd=REPO_ROOT, check=True, timeout=120)
    assert open_storage(backend.uri).read("run/b.bin") == b"from the test and back"


def test_local_writes_during_an_outage_raise_storage_error(tmp_path: Path) -> None:
    """The clean-up of the temporary file fails too (NotADirectoryError): it must not replace the StorageError."""
    local = LocalBackend(tmp_path)
    local.stop()
    storage = open_storage(local.uri)
    calls = (
        lambda: storage.write("run/a.bin", b"a"),
        lambda: storage.write_new("run/b.bin", b"b"),
        lambda: storage.write_many("run/gen", {"c.bin": b"c"}),
    )
    for call in calls:
        with pytest.raises(StorageError, match="Not a directory"):
            call()
