"""S3Storage against a real S3 server (moto in server mode on 127.0.0.1): no in-process mocks."""

from __future__ import annotations

import base64
import hashlib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from cloud import checkpoint as ckpt
from cloud.checkpoint import Checkpoint, CheckpointError
from cloud.s3 import S3Storage
from cloud.storage import LocalStorage, StorageError, check_writable, open_storage
from tests.cloud.s3_server import FAKE_SECRET, S3Server, free_port, s3_env, s3_server  # noqa: F401

RUN = "run"


@pytest.fixture
def storage(s3_server: S3Server, request: pytest.FixtureRequest) -> S3Storage:  # noqa: F811
    """A storage under a prefix of its own, so tests sharing the bucket do not see each other."""
    return S3Storage(s3_server.bucket, f"tests/{request.node.name}", endpoint_url=s3_server.endpoint)


def sample_checkpoint(generation: int) -> Checkpoint:
    return Checkpoint(
        tensors={"agent.w": torch.full((2, 3), float(generation))},
        meta={"generation": generation, "counters": {"env_steps": 10 * generation}},
        blobs={"replay/00000": np.arange(6, dtype=np.float32).tobytes() + bytes([generation])},
    )


# ---------------------------------------------------------------- the five methods


def test_round_trip_with_nested_keys_under_a_prefix(storage: S3Storage, s3_server: S3Server) -> None:  # noqa: F811
    storage.write("run/b/x.bin", b"1")
    storage.write("run/a.bin", b"22")
    storage.write("runner/other.bin", b"3")  # shares the string prefix "run" but not the folder
    assert storage.read("run/a.bin") == b"22"
    assert storage.exists("run/b/x.bin") and not storage.exists("run/b") and not storage.exists("run/c")
    assert storage.list("run") == ["run/a.bin", "run/b/x.bin"]
    assert storage.list("run/") == ["run/a.bin", "run/b/x.bin"]
    assert storage.list("") == ["run/a.bin", "run/b/x.bin", "runner/other.bin"]
    assert storage.list("nothing") == []
    raw = boto3.client("s3", endpoint_url=s3_server.endpoint)
    stored = raw.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{storage.prefix}/")["Contents"]
    assert sorted(item["Key"] for item in stored) == [f"{storage.prefix}/{k}" for k in storage.list("")]
    storage.write("run/a.bin", b"new")
    assert storage.read("run/a.bin") == b"new"
    storage.delete("run/a.bin")
    storage.delete("run/a.bin")  # deleting what is gone is fine
    storage.delete("never/was")
    assert not storage.exists("run/a.bin")
    assert storage.list("run") == ["run/b/x.bin"]


def test_list_paginates(s3_server: S3Server, request: pytest.FixtureRequest) -> None:  # noqa: F811
    storage = S3Storage(s3_server.bucket, f"tests/{request.node.name}", endpoint_url=s3_server.endpoint, page_size=2)
    names = [f"run/k{i:02d}" for i in range(7)]
    for name in reversed(names):
        storage.write(name, b"x")
    calls: list[str] = []
    storage._client.meta.events.register("after-call.s3.ListObjectsV2", lambda **_: calls.append("page"))
    assert storage.list("run") == names
    assert len(calls) == 4


def test_write_sends_a_sha256_checksum_the_server_keeps(storage: S3Storage, s3_server: S3Server) -> None:  # noqa: F811
    data = b"weights" * 1000
    sent: list[object] = []
    storage._client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.headers.get("x-amz-checksum-sha256"))
    )
    storage.write("run/w.bin", data)
    assert sent == [base64.b64encode(hashlib.sha256(data).digest())]  # moto does not verify it, real S3 does
    raw = boto3.client("s3", endpoint_url=s3_server.endpoint)
    head = raw.head_object(Bucket=s3_server.bucket, Key=f"{storage.prefix}/run/w.bin", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_write_new_refuses_to_overwrite(storage: S3Storage) -> None:
    storage.write_new("run/gen-000001/MANIFEST.json", b"first")
    with pytest.raises(StorageError, match=r"gen-000001/MANIFEST.json already exists"):
        storage.write_new("run/gen-000001/MANIFEST.json", b"second")
    assert storage.read("run/gen-000001/MANIFEST.json") == b"first"


def test_a_missing_key_raises_what_local_storage_raises(storage: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as local:
        LocalStorage(tmp_path).read("run/missing")
    with pytest.raises(FileNotFoundError, match="no such S3 object") as remote:
        storage.read("run/missing")
    assert type(remote.value) is type(local.value)
    assert f"s3://{storage.bucket}/{storage.prefix}/run/missing" in str(remote.value)


# ---------------------------------------------------------------- URIs and configuration


def test_from_uri_and_open_storage_use_the_endpoint_from_the_environment(s3_env: S3Server) -> None:  # noqa: F811
    storage = open_storage(f"s3://{s3_env.bucket}/runs/exp1/")
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.endpoint) == (s3_env.bucket, "runs/exp1", s3_env.endpoint)
    storage.write("run/x", b"1")
    assert storage.list("run") == ["run/x"]
    whole_bucket = S3Storage.from_uri(f"s3://{s3_env.bucket}")
    assert whole_bucket.prefix == "" and whole_bucket.read("runs/exp1/run/x") == b"1"


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix/only", "s3:"])
def test_a_uri_without_a_bucket_is_refused(uri: str) -> None:
    with pytest.raises(StorageError, match="names no bucket"):
        S3Storage.from_uri(uri)


# ---------------------------------------------------------------- errors are one clear line


def test_a_missing_bucket_is_named(s3_server: S3Server) -> None:  # noqa: F811
    storage = S3Storage("no-such-bucket", "p", endpoint_url=s3_server.endpoint)
    for call in (lambda: storage.write("k", b"x"), lambda: storage.read("k"), lambda: storage.list("")):
        with pytest.raises(StorageError, match="S3 bucket 'no-such-bucket' does not exist"):
            call()
    with pytest.raises(StorageError, match="S3 bucket 'no-such-bucket' does not exist"):
        check_writable(storage, "run")


def test_no_credentials_at_all(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage = S3Storage(s3_server.bucket, "p", endpoint_url=s3_server.endpoint)
    with pytest.raises(StorageError, match="no AWS credentials found"):
        storage.write("k", b"x")


@pytest.fixture
def iam_auth(s3_server: S3Server) -> Iterator[tuple[str, str]]:  # noqa: F811
    """An IAM user's access key; moto checks signatures and policies only while this fixture is active."""
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint)

    def reset_auth(count: str) -> None:
        url = f"{s3_server.endpoint}/moto-api/reset-auth"
        req = urllib.request.Request(url, data=count.encode(), headers={"Content-Type": "text/plain"}, method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    iam.create_user(UserName="nopolicy")
    try:
        key = iam.create_access_key(UserName="nopolicy")["AccessKey"]
        reset_auth("0")  # from now on every request is authenticated and authorized
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            reset_auth("inf")
    finally:
        for item in iam.list_access_keys(UserName="nopolicy")["AccessKeyMetadata"]:
            iam.delete_access_key(UserName="nopolicy", AccessKeyId=item["AccessKeyId"])
        iam.delete_user(UserName="nopolicy")


@pytest.mark.parametrize("case", ["unknown key", "wrong secret", "no permission"])
def test_bad_credentials_are_access_denied_without_leaking_secrets(
    s3_server: S3Server,  # noqa: F811
    iam_auth: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    key_id, secret = iam_auth
    key_id, secret, expected_code = {
        "unknown key": ("AKIAUNKNOWNUNKNOWN00", FAKE_SECRET, "InvalidAccessKeyId"),
        "wrong secret": (key_id, FAKE_SECRET, "SignatureDoesNotMatch"),
        "no permission": (key_id, secret, "AccessDenied"),
    }[case]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage = S3Storage(s3_server.bucket, "p", endpoint_url=s3_server.endpoint)
    with pytest.raises(StorageError, match=r"S3 access denied to bucket 'evorl-test' .*check AWS credentials") as err:
        storage.write("k", b"x")
    message = str(err.value)
    assert expected_code in message
    assert secret not in message and key_id not in message and "\n" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_an_unreachable_endpoint_fails_within_seconds(s3_server: S3Server) -> None:  # noqa: F811
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = S3Storage("bucket", "p", endpoint_url=endpoint, max_attempts=2, connect_timeout=1)
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {endpoint}"):
        storage.read("k")
    with pytest.raises(StorageError, match="cannot reach S3 endpoint"):
        check_writable(storage, "run")
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- storage checks and checkpoints


def test_check_writable_leaves_nothing_behind(storage: S3Storage) -> None:
    check_writable(storage, "run")
    assert storage.list("") == []


def test_checkpoints_save_and_load_through_s3(storage: S3Storage) -> None:
    for generation in range(3):
        ckpt.save(storage, RUN, generation, sample_checkpoint(generation))
    assert ckpt.generations(storage, RUN) == [2, 1, 0]
    assert storage.read(f"{RUN}/LATEST") == b"gen-000002"
    loaded = ckpt.load(storage, RUN, 1)
    assert torch.equal(loaded.tensors["agent.w"], torch.full((2, 3), 1.0))
    assert loaded.blobs == sample_checkpoint(1).blobs
    assert loaded.meta == {"generation": 1, "counters": {"env_steps": 10}}
    generation, state, rejected = ckpt.load_latest([storage], RUN)
    assert (generation, state.meta["generation"], rejected) == (2, 2, [])


def test_the_layout_in_s3_is_the_local_one_with_objects_content_addressed(storage: S3Storage, tmp_path: Path) -> None:
    local = LocalStorage(tmp_path)
    for target in (storage, local):
        ckpt.save(target, RUN, 0, sample_checkpoint(0))
    manifest = ckpt.read_manifest(storage, RUN, 0)
    own = {f"{RUN}/gen-000000/{name}": f"{RUN}/{entry['key']}" for name, entry in manifest["objects"].items()}
    assert storage.list(RUN) == sorted(own.get(key, key) for key in local.list(RUN))
    for key in local.list(RUN):
        if not key.endswith("MANIFEST.json"):  # every object's bytes are the same (the manifests name keys)
            assert storage.read(own.get(key, key)) == local.read(key), key


def test_a_flipped_byte_in_s3_falls_back_to_the_previous_generation(storage: S3Storage) -> None:
    for generation in range(3):
        ckpt.save(storage, RUN, generation, sample_checkpoint(generation))
    key = f"{RUN}/{ckpt.read_manifest(storage, RUN, 2)['objects']['tensors.safetensors']['key']}"
    blob = bytearray(storage.read(key))
    blob[len(blob) // 2] ^= 0x01
    storage.write(key, bytes(blob))
    with pytest.raises(CheckpointError, match="gen-000002/tensors.safetensors does not match its manifest"):
        ckpt.load(storage, RUN, 2)
    generation, state, rejected = ckpt.load_latest([storage], RUN)
    assert (generation, state.meta["generation"]) == (1, 1)
    assert len(rejected) == 1 and rejected[0].startswith("generation 3 rejected:")


def test_user_info_in_the_endpoint_never_appears_in_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()  # nothing listens there
    storage = S3Storage("bucket", "p", endpoint_url=f"http://admin:hunter2pw@127.0.0.1:{port}", max_attempts=1)
    with pytest.raises(StorageError) as err:
        storage.read("k")
    assert f"127.0.0.1:{port}" in str(err.value) and "hunter2pw" not in str(err.value) and "admin" not in str(err.value)
    assert "hunter2pw" not in repr(storage) and "hunter2pw" not in storage.endpoint
