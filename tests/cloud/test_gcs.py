"""GCSStorage against a real GCS emulator (``gcp-storage-emulator``) served in-process on 127.0.0.1.

The emulator speaks the JSON API over HTTP, so the real ``google-cloud-storage`` client is exercised
end to end; nothing in the client is mocked. It does NOT enforce ``if_generation_match`` (checked
in ``test_the_emulator_ignores_if_generation_match``): ``write_new``'s create-only guarantee, and any
commit race built on it, cannot be tested here and needs real GCS or ``fake-gcs-server``.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gcp_storage_emulator.server import create_server
from google.cloud import storage as gcs

from cloud import checkpoint as ckpt
from cloud.checkpoint import Checkpoint, CheckpointError
from cloud.gcs import GCSStorage
from cloud.storage import StorageError, check_writable, open_storage

RUN = "run"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the emulator; the client library finds the emulator through the environment."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    name = f"test-{uuid.uuid4().hex[:12]}"
    GCSStorage(name).client.create_bucket(name)
    return name


@pytest.fixture
def storage(bucket: str) -> GCSStorage:
    return GCSStorage.from_uri(f"gs://{bucket}/runs/team", timeout=5, deadline=10)


def sample_checkpoint(generation: int) -> Checkpoint:
    return Checkpoint(
        tensors={"agent.w": torch.full((2, 3), float(generation))},
        meta={"generation": generation, "counters": {"env_steps": 10 * generation}},
        blobs={"replay/00000": np.arange(6, dtype=np.float32).tobytes() + bytes([generation])},
    )


# ---------------------------------------------------------------- the five methods


def test_round_trip_under_a_prefix_with_nested_keys(storage: GCSStorage) -> None:
    storage.write("run/b/x.bin", b"1")
    storage.write("run/a.bin", b"22")
    storage.write("runner/other.bin", b"3")  # shares the string prefix "run", not the folder
    assert storage.read("run/a.bin") == b"22"
    assert storage.exists("run/b/x.bin") and not storage.exists("run/b") and not storage.exists("run/zzz")
    assert storage.list("run") == ["run/a.bin", "run/b/x.bin"]
    assert storage.list("") == ["run/a.bin", "run/b/x.bin", "runner/other.bin"]
    assert storage.list("nothing") == []
    storage.write("run/a.bin", b"replaced")
    assert storage.read("run/a.bin") == b"replaced"
    storage.delete("run/a.bin")
    storage.delete("run/a.bin")  # deleting what is gone is fine
    assert not storage.exists("run/a.bin")
    assert storage.list("run") == ["run/b/x.bin"]


def test_keys_are_stored_under_the_uri_prefix(storage: GCSStorage, bucket: str) -> None:
    storage.write("run/k", b"v")
    names = [blob.name for blob in storage.client.list_blobs(bucket)]
    assert names == ["runs/team/run/k"]


def test_an_object_larger_than_one_multipart_upload_round_trips(storage: GCSStorage) -> None:
    data = bytes(range(256)) * (9 * 1024 * 4)  # 9 MiB: the client switches to a resumable upload
    storage.write("run/big.bin", data)
    assert storage.read("run/big.bin") == data


def test_reading_a_missing_key_raises_file_not_found(storage: GCSStorage) -> None:
    with pytest.raises(FileNotFoundError, match="runs/team/run/missing"):
        storage.read("run/missing")


def test_write_new_creates_an_object(storage: GCSStorage) -> None:
    storage.write_new("run/gen-000001/MANIFEST.json", b"{}")
    assert storage.read("run/gen-000001/MANIFEST.json") == b"{}"


def test_the_emulator_ignores_if_generation_match(storage: GCSStorage) -> None:
    """Documents the limit of this emulator: a second create-only write succeeds here.

    Real GCS answers 412 and ``write_new`` raises ``StorageError("... already exists")``; if a
    future emulator starts enforcing the precondition, this test says so and should be turned
    into a test of that error.
    """
    storage.write_new("run/once", b"first")
    try:
        storage.write_new("run/once", b"second")
    except StorageError as err:
        assert "already exists" in str(err)
        pytest.fail("the emulator now enforces if_generation_match: test write_new's refusal here")
    assert storage.read("run/once") == b"second"


# ---------------------------------------------------------------- errors


def test_a_missing_bucket_is_named(emulator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    storage = GCSStorage.from_uri("gs://no-such-bucket/prefix", timeout=5, deadline=10)
    for call in (lambda: storage.read("k"), lambda: storage.write("k", b"x"), lambda: storage.list("")):
        with pytest.raises(StorageError, match="GCS bucket 'no-such-bucket' does not exist"):
            call()
    assert not storage.exists("k")


@pytest.mark.parametrize("uri", ["gs://", "gs:///prefix"])
def test_a_uri_without_a_bucket_is_refused(uri: str) -> None:
    with pytest.raises(StorageError, match="has no bucket name"):
        GCSStorage.from_uri(uri)


def test_an_unreachable_endpoint_fails_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    storage = GCSStorage.from_uri("gs://bucket/prefix", timeout=1, deadline=2)
    for call in (lambda: storage.read("k"), lambda: check_writable(storage, "run")):
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"cannot reach GCS at 127\.0\.0\.1:\d+ for bucket 'bucket'"):
            call()
        assert time.monotonic() - start < 6


def test_missing_credentials_fail_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(StorageError, match="no Google Cloud credentials found") as info:
        GCSStorage.from_uri("gs://bucket/prefix")
    assert "\n" not in str(info.value)


def test_a_broken_key_file_is_never_echoed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = "SECRET-KEY-MATERIAL-1234"
    key = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": secret,
        "private_key": f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n",
        "client_email": "x@p.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    (tmp_path / "key.json").write_text(json.dumps(key))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    with pytest.raises(StorageError) as info:
        GCSStorage.from_uri("gs://bucket/prefix")
    assert "could not be loaded" in str(info.value) and secret not in str(info.value)


# ---------------------------------------------------------------- wiring and checkpoints


def test_open_storage_dispatches_gs_uris(bucket: str) -> None:
    storage = open_storage(f"gs://{bucket}/some/prefix")
    assert isinstance(storage, GCSStorage)
    assert (storage.bucket_name, storage.prefix) == (bucket, "some/prefix")
    storage.write("k", b"v")
    assert storage.read("k") == b"v"


def test_check_writable_leaves_nothing_behind(storage: GCSStorage) -> None:
    check_writable(storage, "run")
    assert storage.list("") == []


def test_check_writable_names_a_missing_bucket(emulator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    with pytest.raises(StorageError, match="GCS bucket 'absent' does not exist"):
        check_writable(GCSStorage.from_uri("gs://absent/runs"), "run")


def test_checkpoints_round_trip_in_the_local_format(storage: GCSStorage) -> None:
    for generation in range(2):
        ckpt.save(storage, RUN, generation, sample_checkpoint(generation))
    assert storage.list(f"{RUN}/gen-000001") == [f"{RUN}/gen-000001/MANIFEST.json"]
    assert storage.read(f"{RUN}/LATEST") == b"gen-000001"
    loaded = ckpt.load(storage, RUN, 1)
    assert torch.equal(loaded.tensors["agent.w"], torch.full((2, 3), 1.0))
    assert loaded.blobs == sample_checkpoint(1).blobs
    assert loaded.meta == sample_checkpoint(1).meta
    generation, state, rejected = ckpt.load_latest([storage], RUN)
    assert (generation, state.meta["generation"], rejected) == (1, 1, [])


def test_a_flipped_byte_in_the_bucket_falls_back_to_the_previous_generation(storage: GCSStorage, bucket: str) -> None:
    for generation in range(3):
        ckpt.save(storage, RUN, generation, sample_checkpoint(generation))
    key = ckpt.read_manifest(storage, RUN, 2)["objects"]["tensors.safetensors"]["key"]
    blob = gcs.Client().bucket(bucket).blob(f"runs/team/{RUN}/{key}")  # behind GCSStorage's back
    data = bytearray(blob.download_as_bytes())
    data[len(data) // 2] ^= 0x01
    blob.upload_from_string(bytes(data))
    with pytest.raises(CheckpointError, match="gen-000002/tensors.safetensors does not match its manifest"):
        ckpt.load(storage, RUN, 2)
    generation, state, rejected = ckpt.load_latest([storage], RUN)
    assert generation == 1 and state.meta["generation"] == 1
    assert len(rejected) == 1 and rejected[0].startswith("generation 3 rejected:")


def test_key_material_pasted_into_the_variable_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "SECRET-KEY-MATERIAL-5678"
    pasted = json.dumps({"type": "service_account", "private_key": f"-----BEGIN PRIVATE KEY-----\n{secret}\n"})
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", pasted)  # the key itself instead of a path to it
    with pytest.raises(StorageError) as info:
        GCSStorage.from_uri("gs://bucket/prefix")
    assert "could not be loaded" in str(info.value)
    assert secret not in str(info.value) and "BEGIN PRIVATE KEY" not in str(info.value)
