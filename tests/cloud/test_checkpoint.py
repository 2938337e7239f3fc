from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from cloud import checkpoint as ckpt
from cloud.checkpoint import Checkpoint, CheckpointError
from cloud.storage import AlreadyExists, LocalStorage

RUN = "run"


def sample_checkpoint(generation: int = 0) -> Checkpoint:
    return Checkpoint(
        tensors={"agent.w": torch.full((2, 3), float(generation)), "rng.torch": torch.get_rng_state()},
        meta={"generation": generation, "counters": {"env_steps": 10 * generation}, "rng": [1, 2, 3]},
        blobs={"replay/00000": b"shard zero", "replay/00001": f"shard one of generation {generation}".encode()},
    )


def blob_path(storage: LocalStorage, data: bytes) -> Path:
    return storage.root / RUN / ckpt.OBJECTS / hashlib.sha256(data).hexdigest()


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def saved(storage: LocalStorage, generations: int) -> LocalStorage:
    for generation in range(generations):
        ckpt.save(storage, RUN, generation, sample_checkpoint(generation))
    return storage


def object_path(storage: LocalStorage, generation: int, name: str) -> Path:
    """Where a generation's manifest, or an object it lists by ``name``, is stored."""
    manifest = storage.root / ckpt.manifest_key(RUN, generation)
    if name == ckpt.MANIFEST:
        return manifest
    entry = json.loads(manifest.read_text())["objects"][name]
    return storage.root / RUN / entry.get("key", f"gen-{generation:06d}/{name}")


def rewrite_manifest_entry(storage: LocalStorage, generation: int, name: str, data: bytes) -> None:
    """Replace an object and make the manifest vouch for it (an attacker who controls the bucket)."""
    object_path(storage, generation, name).write_bytes(data)
    manifest_path = object_path(storage, generation, ckpt.MANIFEST)
    manifest = json.loads(manifest_path.read_text())
    manifest["objects"][name].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))


def flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


# ---------------------------------------------------------------- round trip


def test_save_then_load_round_trips_tensors_blobs_and_meta(storage: LocalStorage) -> None:
    original = sample_checkpoint(3)
    ckpt.save(storage, RUN, 3, original)
    loaded = ckpt.load(storage, RUN, 3)
    assert sorted(loaded.tensors) == sorted(original.tensors)
    for name, tensor in original.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    assert loaded.blobs == original.blobs
    assert loaded.meta == original.meta


def test_save_writes_objects_shared_blobs_a_manifest_and_the_latest_hint(storage: LocalStorage) -> None:
    saved(storage, 2)
    prefix = f"{RUN}/gen-000001/"
    assert sorted(k[len(prefix) :] for k in storage.list(prefix)) == [
        "MANIFEST.json",
        "state.json",
        "tensors.safetensors",
    ]
    manifest = json.loads(storage.read(f"{prefix}MANIFEST.json"))
    assert manifest["format"] == ckpt.FORMAT and manifest["generation"] == 1
    for name, entry in manifest["objects"].items():
        data = storage.read(prefix + name)
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for name, ref in manifest["shared"].items():
        data = storage.read(f"{RUN}/{ref['key']}")
        assert data == sample_checkpoint(1).blobs[name]
        assert ref == {"key": f"objects/{hashlib.sha256(data).hexdigest()}", "size": len(data), "sha256": ref["sha256"]}
    assert storage.read(f"{RUN}/LATEST") == b"gen-000001"
    assert not list(storage.root.glob(f"{RUN}/.*")), "no temporary folder or file is left behind"


def test_unchanged_blobs_are_referenced_not_written_again(storage: LocalStorage) -> None:
    refs = ckpt.save(storage, RUN, 0, sample_checkpoint(0))
    zero = blob_path(storage, b"shard zero")
    written = zero.stat().st_mtime_ns
    second = sample_checkpoint(1)
    second.blobs["replay/00000"] = refs["replay/00000"]
    ckpt.save(storage, RUN, 1, second)
    assert zero.stat().st_mtime_ns == written
    assert ckpt.load(storage, RUN, 1).blobs["replay/00000"] == b"shard zero"
    assert len(storage.list(f"{RUN}/{ckpt.OBJECTS}")) == 3  # shard zero once, shard one of each generation


def test_a_committed_generation_is_never_overwritten(storage: LocalStorage) -> None:
    saved(storage, 1)
    with pytest.raises(AlreadyExists, match="already"):
        ckpt.save(storage, RUN, 0, sample_checkpoint(5))
    assert ckpt.load(storage, RUN, 0).meta["generation"] == 0


def test_an_uncommitted_attempt_is_replaced(storage: LocalStorage) -> None:
    saved(storage, 1)
    object_path(storage, 0, ckpt.MANIFEST).unlink()  # a crash right before the commit
    ckpt.save(storage, RUN, 0, sample_checkpoint(7))
    assert ckpt.load(storage, RUN, 0).meta["generation"] == 7


def test_generations_lists_committed_generations_newest_first(storage: LocalStorage) -> None:
    saved(storage, 3)
    assert ckpt.generations(storage, RUN) == [2, 1, 0]
    object_path(storage, 2, ckpt.MANIFEST).unlink()  # an uncommitted generation does not exist
    assert ckpt.generations(storage, RUN) == [1, 0]
    assert ckpt.generations(storage, "other") == []


def test_load_latest_takes_the_newest_generation(storage: LocalStorage) -> None:
    saved(storage, 3)
    generation, state, rejected = ckpt.load_latest([storage], RUN)
    assert (generation, state.meta["generation"], rejected) == (2, 2, [])


# ---------------------------------------------------------------- damaged checkpoints


def test_a_flipped_byte_rejects_the_generation_and_falls_back(storage: LocalStorage) -> None:
    saved(storage, 3)
    flip_a_byte(object_path(storage, 2, "tensors.safetensors"))
    with pytest.raises(CheckpointError, match="gen-000002/tensors.safetensors does not match its manifest"):
        ckpt.load(storage, RUN, 2)
    generation, state, rejected = ckpt.load_latest([storage], RUN)
    assert generation == 1 and state.meta["generation"] == 1
    assert len(rejected) == 1
    assert rejected[0].startswith("generation 3 rejected:") and "does not match its manifest" in rejected[0]


def test_every_object_is_verified(storage: LocalStorage) -> None:
    saved(storage, 2)
    flip_a_byte(object_path(storage, 1, "state.json"))
    generation, _, rejected = ckpt.load_latest([storage], RUN)
    assert generation == 0
    assert "state.json" in rejected[0]


def test_shared_blobs_are_verified(storage: LocalStorage) -> None:
    saved(storage, 2)
    flip_a_byte(blob_path(storage, b"shard one of generation 1"))
    generation, _, rejected = ckpt.load_latest([storage], RUN)
    assert generation == 0
    assert "objects/" in rejected[0] and "does not match its manifest" in rejected[0]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_truncated_or_missing_object_rejects_the_generation(storage: LocalStorage, damage: str) -> None:
    saved(storage, 2)
    path = object_path(storage, 1, "tensors.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    reason = "does not match its manifest" if damage == "truncate" else "is missing"
    with pytest.raises(CheckpointError, match=f"gen-000001/tensors.safetensors {reason}"):
        ckpt.load(storage, RUN, 1)
    generation, _, rejected = ckpt.load_latest([storage], RUN)
    assert generation == 0 and reason in rejected[0]


def test_a_damaged_object_is_taken_from_the_other_copy(tmp_path: Path) -> None:
    local, remote = saved(LocalStorage(tmp_path / "local"), 2), saved(LocalStorage(tmp_path / "remote"), 2)
    flip_a_byte(object_path(local, 1, "tensors.safetensors"))
    blob_path(remote, b"shard one of generation 1").unlink()
    generation, state, rejected = ckpt.load_latest([local, remote], RUN)
    assert (generation, rejected) == (1, [])
    assert state.blobs["replay/00001"] == b"shard one of generation 1"
    assert torch.equal(state.tensors["agent.w"], torch.full((2, 3), 1.0))


def test_the_newest_generation_of_either_location_wins(tmp_path: Path) -> None:
    local, remote = saved(LocalStorage(tmp_path / "local"), 2), saved(LocalStorage(tmp_path / "remote"), 4)
    generation, state, _ = ckpt.load_latest([local, remote], RUN)
    assert generation == 3 and state.meta["generation"] == 3


def test_discard_removes_rejected_manifests_so_they_can_be_committed_again(storage: LocalStorage) -> None:
    saved(storage, 4)
    flip_a_byte(object_path(storage, 3, "tensors.safetensors"))
    flip_a_byte(object_path(storage, 2, "state.json"))
    latest = ckpt.find_latest([storage], RUN)
    assert latest.generation == 1
    assert [(r.generation, r.storage) for r in latest.discard(RUN)] == [(3, storage), (2, storage)]
    assert ckpt.generations(storage, RUN) == [1, 0]
    ckpt.save(storage, RUN, 2, sample_checkpoint(2))
    assert ckpt.generations(storage, RUN) == [2, 1, 0]


def test_a_manifest_pointing_outside_the_blob_folder_is_refused(storage: LocalStorage) -> None:
    saved(storage, 1)
    (storage.root / "secret").write_bytes(b"not part of any run")
    manifest_path = object_path(storage, 0, ckpt.MANIFEST)
    manifest = json.loads(manifest_path.read_text())
    manifest["shared"]["replay/00000"] = {"key": "../secret", "size": 19, "sha256": hashlib.sha256(b"x").hexdigest()}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside objects/"):
        ckpt.load(storage, RUN, 0)


def test_a_missing_manifest_means_no_generation(storage: LocalStorage) -> None:
    saved(storage, 2)
    object_path(storage, 1, ckpt.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="MANIFEST.json is missing"):
        ckpt.load(storage, RUN, 1)
    generation, _, rejected = ckpt.load_latest([storage], RUN)
    assert (generation, rejected) == (0, [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "other/9", "objects": {}}', "is not a evorl-checkpoint/3"),
        ('{"format": "evorl-checkpoint/1", "objects": {}}', "is not a evorl-checkpoint/3"),
        ("[1, 2]", "is not a evorl-checkpoint/3"),
        ('{"format": "evorl-checkpoint/3", "generation": 1}', "is malformed"),
        ('{"format": "evorl-checkpoint/3", "generation": 0, "objects": {}}', "names generation 0, not 1"),
        ('{"format": "evorl-checkpoint/3", "generation": 1, "objects": {"state.json": {}}}', "is malformed"),
        ('{"format": "evorl-checkpoint/3", "generation": 1, "objects": {"a": 1}}', "is malformed"),
        ('{"format": "evorl-checkpoint/3", "generation": "1", "objects": {}}', "names generation '1', not 1"),
    ],
)
def test_an_invalid_manifest_rejects_the_generation(storage: LocalStorage, text: str, message: str) -> None:
    saved(storage, 2)
    object_path(storage, 1, ckpt.MANIFEST).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        ckpt.load(storage, RUN, 1)
    generation, _, rejected = ckpt.load_latest([storage], RUN)
    assert generation == 0 and message in rejected[0]


def test_no_verified_generation_at_all(storage: LocalStorage) -> None:
    saved(storage, 1)
    flip_a_byte(object_path(storage, 0, "tensors.safetensors"))
    with pytest.raises(CheckpointError, match=r"no verified checkpoint in .*/run \(generation 1 rejected"):
        ckpt.load_latest([storage], RUN)
    with pytest.raises(CheckpointError, match="no verified checkpoint"):
        ckpt.load_latest([storage], "empty")


# ---------------------------------------------------------------- retention


def test_prune_keeps_the_newest_generations(storage: LocalStorage) -> None:
    saved(storage, 5)
    ckpt.prune(storage, RUN, keep=2)
    assert ckpt.generations(storage, RUN) == [4, 3]
    assert not (storage.root / RUN / "gen-000000").exists()
    assert not (storage.root / RUN / "gen-000002").exists()
    assert ckpt.load(storage, RUN, 3).meta["generation"] == 3
    ckpt.prune(storage, RUN, keep=1)
    assert ckpt.generations(storage, RUN) == [4]


def test_prune_deletes_blobs_that_no_kept_generation_references(storage: LocalStorage) -> None:
    refs = ckpt.save(storage, RUN, 0, sample_checkpoint(0))
    for generation in (1, 2):
        state = sample_checkpoint(generation)
        state.blobs["replay/00000"] = refs["replay/00000"]  # unchanged shard: shared by every generation
        ckpt.save(storage, RUN, generation, state)
    deleted = ckpt.prune(storage, RUN, keep=1)
    assert blob_path(storage, b"shard zero").exists()
    assert not blob_path(storage, b"shard one of generation 1").exists()
    assert f"{RUN}/objects/{hashlib.sha256(b'shard one of generation 0').hexdigest()}" in deleted
    assert sorted(storage.list(f"{RUN}/{ckpt.OBJECTS}")) == sorted(
        f"{RUN}/objects/{hashlib.sha256(b).hexdigest()}" for b in (b"shard zero", b"shard one of generation 2")
    )
    assert ckpt.load(storage, RUN, 2).blobs["replay/00000"] == b"shard zero"


def test_prune_spares_protected_generations(storage: LocalStorage) -> None:
    saved(storage, 4)
    ckpt.prune(storage, RUN, keep=1, protect={1})
    assert ckpt.generations(storage, RUN) == [3, 1]
    assert ckpt.load(storage, RUN, 1).meta["generation"] == 1


def test_an_unreadable_manifest_is_reported_and_garbage_still_collected(storage: LocalStorage) -> None:
    saved(storage, 3)
    object_path(storage, 2, ckpt.MANIFEST).write_text("{damaged")
    problems: list[str] = []
    ckpt.prune(storage, RUN, keep=2, problems=problems)
    assert not blob_path(storage, b"shard one of generation 0").exists()  # GC went on
    assert blob_path(storage, b"shard one of generation 1").exists()  # generation 2 is kept
    assert len(problems) == 1 and "gen-000002/MANIFEST.json is not valid JSON" in problems[0]


def test_prune_with_fewer_generations_than_kept_deletes_nothing(storage: LocalStorage) -> None:
    saved(storage, 2)
    ckpt.prune(storage, RUN, keep=3)
    assert ckpt.generations(storage, RUN) == [1, 0]


# ---------------------------------------------------------------- loading never executes code


class _TouchFile:
    """Unpickling this runs ``os.system`` (the classic pickle payload)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.path}'",)


def test_payload_is_live_when_loaded_unsafely(tmp_path: Path) -> None:
    """Control for the test below: the same payload does run code under a plain pickle load."""
    marker = tmp_path / "executed"
    buffer = io.BytesIO()
    torch.save({"agent.w": _TouchFile(marker)}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert marker.exists()


def _pickle_payloads(marker: Path) -> dict[str, bytes]:
    """Files that run ``touch marker`` when unpickled: a torch.save file and a plain pickle."""
    buffer = io.BytesIO()
    torch.save({"agent.w": _TouchFile(marker)}, buffer)
    return {"torch.save": buffer.getvalue(), "pickle": pickle.dumps({"agent.w": _TouchFile(marker)})}


def _crafted_tensor_files() -> dict[str, tuple[bytes, str]]:
    """Tensor files an attacker who can write the bucket might commit, and why each is refused."""

    def file(header: dict[str, object] | bytes, data: bytes, claimed: int | None = None) -> bytes:
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        return struct.pack("<Q", len(text) if claimed is None else claimed) + text + data

    def f32(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict[str, object]:
        return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}

    twice = b'{"agent.w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "agent.w": '
    twice += b'{"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}'
    return {
        "size-lies": (file({"agent.w": f32([64, 64], 0, 16)}, bytes(16)), "does not take 16 bytes"),
        "offset-past-the-end": (file({"agent.w": f32([2**28], 0, 2**30)}, bytes(16)), "outside the 16 data bytes"),
        "header-of-6-GiB": (file({"agent.w": f32([1], 0, 4)}, bytes(4), claimed=6 * 2**30), "claims 6,442,450,944"),
        "unknown-dtype": (file({"agent.w": f32([1], 0, 4, dtype="OBJECT")}, bytes(4)), "dtype 'OBJECT'"),
        "duplicate": (file(twice, bytes(8)), "'agent.w' appears twice"),
        "overlapping": (file({"agent.w": f32([2], 0, 8), "rng.torch": f32([2], 4, 12)}, bytes(12)), "overlaps"),
    }


@pytest.mark.parametrize("payload", ["torch.save", "pickle"])
def test_a_pickle_payload_renamed_to_the_tensor_file_is_refused_unexecuted(
    storage: LocalStorage, tmp_path: Path, payload: str
) -> None:
    saved(storage, 2)
    marker = tmp_path / "pwned"
    rewrite_manifest_entry(storage, 1, ckpt.TENSORS, _pickle_payloads(marker)[payload])
    with pytest.raises(CheckpointError, match=r"gen-000001/tensors.safetensors refused: not a safetensors file"):
        ckpt.load(storage, RUN, 1)
    generation, _, rejected = ckpt.load_latest([storage], RUN)
    assert generation == 0 and rejected[0].startswith("generation 2 rejected:") and "refused" in rejected[0]
    assert not marker.exists()


@pytest.mark.parametrize("crafted", list(_crafted_tensor_files()))
def test_a_crafted_tensor_file_rejects_the_generation_in_one_line(storage: LocalStorage, crafted: str) -> None:
    saved(storage, 3)
    data, reason = _crafted_tensor_files()[crafted]
    rewrite_manifest_entry(storage, 2, ckpt.TENSORS, data)  # its manifest vouches for it
    latest = ckpt.find_latest([storage], RUN)
    assert latest.generation == 1 and latest.checkpoint.meta["generation"] == 1  # the previous verified one
    [line] = latest.rejected()
    assert line.startswith("generation 3 rejected: ") and "gen-000002/tensors.safetensors refused" in line
    assert reason in line and "\n" not in line
    assert [r.generation for r in latest.discard(RUN)] == [2]  # like any damaged generation


def test_a_state_file_that_is_not_json_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    saved(storage, 1)
    rewrite_manifest_entry(storage, 0, "state.json", pickle.dumps(_TouchFile(tmp_path / "pwned")))
    with pytest.raises(CheckpointError, match="state.json cannot be decoded"):
        ckpt.load(storage, RUN, 0)
    assert not (tmp_path / "pwned").exists()


def test_prune_also_keeps_every_mth_generation(storage: LocalStorage) -> None:
    saved(storage, 12)
    ckpt.prune(storage, RUN, keep=2, every=5)
    assert ckpt.generations(storage, RUN) == [11, 10, 9, 4]  # the newest two, and generations 5 and 10 (1-based)
