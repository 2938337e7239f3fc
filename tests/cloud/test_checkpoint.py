from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud import checkpoint as ckpt
from cloud.checkpoint import Checkpoint, CheckpointError
from cloud.storage import LocalStorage

RUN = "run"


def sample_checkpoint(generation: int = 0) -> Checkpoint:
    return Checkpoint(
        tensors={"agent.w": torch.full((2, 3), float(generation)), "rng.torch": torch.get_rng_state()},
        arrays={"obs": np.arange(12, dtype=np.float32).reshape(3, 4) + generation, "flags": np.array([True, False])},
        meta={"generation": generation, "counters": {"env_steps": 10 * generation}, "rng": [1, 2, 3]},
    )


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def saved(storage: LocalStorage, generations: int) -> LocalStorage:
    for generation in range(generations):
        ckpt.save(storage, RUN, generation, sample_checkpoint(generation))
    return storage


def object_path(storage: LocalStorage, generation: int, name: str) -> Path:
    return storage.root / ckpt.generation_prefix(RUN, generation) / name


def rewrite_manifest_entry(storage: LocalStorage, generation: int, name: str, data: bytes) -> None:
    """Replace an object and make the manifest vouch for it (an attacker who controls the bucket)."""
    object_path(storage, generation, name).write_bytes(data)
    manifest_path = object_path(storage, generation, ckpt.MANIFEST)
    manifest = json.loads(manifest_path.read_text())
    manifest["objects"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


def flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


# ---------------------------------------------------------------- round trip


def test_save_then_load_round_trips_tensors_arrays_and_meta(storage: LocalStorage) -> None:
    original = sample_checkpoint(3)
    ckpt.save(storage, RUN, 3, original)
    loaded = ckpt.load(storage, RUN, 3)
    assert sorted(loaded.tensors) == sorted(original.tensors)
    for name, tensor in original.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    assert sorted(loaded.arrays) == sorted(original.arrays)
    for name, array in original.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], array)
        assert loaded.arrays[name].dtype == array.dtype
    assert loaded.meta == original.meta


def test_save_writes_objects_a_manifest_and_the_latest_hint(storage: LocalStorage) -> None:
    saved(storage, 2)
    keys = storage.list(f"{RUN}/gen-000001")
    prefix = f"{RUN}/gen-000001/"
    assert sorted(k[len(prefix) :] for k in keys) == [
        "MANIFEST.json",
        "arrays/flags.npy",
        "arrays/obs.npy",
        "state.json",
        "tensors.pt",
    ]
    manifest = json.loads(storage.read(f"{prefix}MANIFEST.json"))
    assert manifest["format"] == ckpt.FORMAT and manifest["generation"] == 1
    for name, entry in manifest["objects"].items():
        data = storage.read(prefix + name)
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert storage.read(f"{RUN}/LATEST") == b"gen-000001"


def test_generations_lists_committed_generations_newest_first(storage: LocalStorage) -> None:
    saved(storage, 3)
    assert ckpt.generations(storage, RUN) == [2, 1, 0]
    object_path(storage, 2, ckpt.MANIFEST).unlink()  # an uncommitted generation does not exist
    assert ckpt.generations(storage, RUN) == [1, 0]
    assert ckpt.generations(storage, "other") == []


def test_load_latest_takes_the_newest_generation(storage: LocalStorage) -> None:
    saved(storage, 3)
    generation, state, rejected = ckpt.load_latest(storage, RUN)
    assert (generation, state.meta["generation"], rejected) == (2, 2, [])


# ---------------------------------------------------------------- damaged checkpoints


def test_a_flipped_byte_rejects_the_generation_and_falls_back(storage: LocalStorage) -> None:
    saved(storage, 3)
    flip_a_byte(object_path(storage, 2, "tensors.pt"))
    with pytest.raises(CheckpointError, match="gen-000002/tensors.pt does not match its manifest"):
        ckpt.load(storage, RUN, 2)
    generation, state, rejected = ckpt.load_latest(storage, RUN)
    assert generation == 1 and state.meta["generation"] == 1
    assert len(rejected) == 1
    assert rejected[0].startswith("generation 2 rejected:") and "does not match its manifest" in rejected[0]


@pytest.mark.parametrize("name", ["state.json", "arrays/obs.npy"])
def test_every_object_is_verified(storage: LocalStorage, name: str) -> None:
    saved(storage, 2)
    flip_a_byte(object_path(storage, 1, name))
    generation, _, rejected = ckpt.load_latest(storage, RUN)
    assert generation == 0
    assert name in rejected[0]


def test_a_missing_object_rejects_the_generation(storage: LocalStorage) -> None:
    saved(storage, 2)
    object_path(storage, 1, "arrays/obs.npy").unlink()
    with pytest.raises(CheckpointError, match="arrays/obs.npy is missing"):
        ckpt.load(storage, RUN, 1)
    generation, _, rejected = ckpt.load_latest(storage, RUN)
    assert generation == 0 and "is missing" in rejected[0]


def test_a_missing_manifest_means_no_generation(storage: LocalStorage) -> None:
    saved(storage, 2)
    object_path(storage, 1, ckpt.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="MANIFEST.json is missing"):
        ckpt.load(storage, RUN, 1)
    generation, _, rejected = ckpt.load_latest(storage, RUN)
    assert (generation, rejected) == (0, [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "other/9", "objects": {}}', "is not a evorl-checkpoint/1"),
        ("[1, 2]", "is not a evorl-checkpoint/1"),
    ],
)
def test_an_invalid_manifest_rejects_the_generation(storage: LocalStorage, text: str, message: str) -> None:
    saved(storage, 2)
    object_path(storage, 1, ckpt.MANIFEST).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        ckpt.load(storage, RUN, 1)
    generation, _, rejected = ckpt.load_latest(storage, RUN)
    assert generation == 0 and message in rejected[0]


def test_no_verified_generation_at_all(storage: LocalStorage) -> None:
    saved(storage, 1)
    flip_a_byte(object_path(storage, 0, "tensors.pt"))
    with pytest.raises(CheckpointError, match=r"no verified checkpoint in run 'run' \(generation 0 rejected"):
        ckpt.load_latest(storage, RUN)
    with pytest.raises(CheckpointError, match="no verified checkpoint"):
        ckpt.load_latest(storage, "empty")


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


def test_a_tensor_file_that_would_execute_code_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    saved(storage, 2)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"agent.w": _TouchFile(marker)}, buffer)
    rewrite_manifest_entry(storage, 1, "tensors.pt", buffer.getvalue())
    with pytest.raises(CheckpointError, match="tensors.pt holds objects other than tensors"):
        ckpt.load(storage, RUN, 1)
    assert not marker.exists()
    generation, _, rejected = ckpt.load_latest(storage, RUN)
    assert generation == 0 and "refused" in rejected[0]
    assert not marker.exists()


def test_an_array_file_holding_pickled_objects_is_refused(storage: LocalStorage) -> None:
    saved(storage, 1)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    rewrite_manifest_entry(storage, 0, "arrays/obs.npy", buffer.getvalue())
    with pytest.raises(CheckpointError, match="cannot be decoded"):
        ckpt.load(storage, RUN, 0)


def test_prune_also_keeps_every_mth_generation(storage: LocalStorage) -> None:
    saved(storage, 12)
    ckpt.prune(storage, RUN, keep=2, every=5)
    assert ckpt.generations(storage, RUN) == [11, 10, 9, 4]  # the newest two, and generations 5 and 10 (1-based)
