"""Checkpoints of the previous format (tensors in a torch.save pickle): refused by the trainer with
one line saying how to convert them, never deleted, and converted in place by ``cloud.convert``,
over a local folder, a moto S3 server and a GCS emulator."""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cloud import checkpoint as ckpt
from cloud import convert
from cloud.checkpoint import CheckpointError
from cloud.storage import LocalStorage, Storage, open_storage
from config import UserError
from tests.cloud.servers import Backend, backend_fixture  # noqa: F401
from tests.cloud.test_checkpoint import sample_checkpoint
from tests.cloud.test_tensorfile import assert_bit_equal
from tests.training.test_trainer import RICH, TinyConfig, assert_same_run, resume, train

RUN = "run"


@pytest.fixture
def store(backend: Backend) -> Storage:
    return open_storage(backend.uri)


def saved(storage: Storage, generations: int) -> Storage:
    for generation in range(generations):
        ckpt.save(storage, RUN, generation, sample_checkpoint(generation))
    return storage


def downgrade(store: Storage, run: str, generation: int, payload: bytes | None = None) -> None:
    """Rewrite a committed generation as the previous format had it: its tensors (or ``payload``)
    in a torch.save ``tensors.pt``, a manifest of ``evorl-checkpoint/2``."""
    key = ckpt.manifest_key(run, generation)
    manifest = json.loads(store.read(key))
    buffer = io.BytesIO()
    torch.save(ckpt.load(store, run, generation).tensors, buffer)
    data = payload if payload is not None else buffer.getvalue()
    prefix = ckpt.generation_prefix(run, generation)
    new = manifest["objects"].pop(ckpt.TENSORS)
    if isinstance(store, LocalStorage):
        store.write(f"{prefix}/tensors.pt", data)
        store.delete(f"{prefix}/{ckpt.TENSORS}")
        entry = ckpt.object_entry(data)
    else:
        store.delete(f"{run}/{new['key']}")  # a converter that writes nothing cannot pass for one that does
        entry = ckpt.write_object(store, run, data).to_dict()
    manifest["objects"]["tensors.pt"] = entry
    store.write(key, ckpt.encode_manifest({**manifest, "format": ckpt.PREVIOUS_FORMAT}))


def old_run(store: Storage, generations: int) -> Storage:
    saved(store, generations)
    for generation in range(generations):
        downgrade(store, RUN, generation)
    return store


# ---------------------------------------------------------------- the trainer refuses, and deletes nothing


def test_a_run_of_the_previous_format_is_refused_in_one_line_saying_how_to_convert(store: Storage) -> None:
    old_run(store, 2)
    with pytest.raises(CheckpointError) as caught:
        ckpt.find_latest([store], RUN)
    message = str(caught.value)
    assert "\n" not in message and "generation 2 rejected" in message
    assert f"previous format {ckpt.PREVIOUS_FORMAT}" in message
    assert f"python -m cloud.convert {store.url('')} {RUN}" in message
    assert ckpt.generations(store, RUN) == [1, 0]


def test_a_previous_format_generation_is_never_discarded(store: Storage) -> None:
    saved(store, 3)
    downgrade(store, RUN, 2)  # e.g. a bucket not converted yet
    latest = ckpt.find_latest([store], RUN)
    assert latest.generation == 1
    [line] = latest.rejected()
    assert line.startswith("generation 3 rejected:") and "python -m cloud.convert" in line
    assert latest.discard(RUN) == []
    assert ckpt.generations(store, RUN) == [2, 1, 0]


def test_retention_keeps_the_objects_of_a_previous_format_generation(store: Storage) -> None:
    old_run(store, 2)
    problems: list[str] = []
    ckpt.prune(store, RUN, keep=2, problems=problems)
    assert problems == []
    for generation in (0, 1):
        manifest = ckpt.read_manifest(store, RUN, generation, previous=True)
        for key, entry in ckpt.manifest_objects(manifest, RUN):
            assert store.exists(key) or store.exists(f"{RUN}/{ckpt.OBJECTS}/{entry['sha256']}"), key


def test_a_converted_copy_is_used_and_the_unconverted_one_named(store: Storage, tmp_path: Path) -> None:
    local = saved(LocalStorage(tmp_path / "local"), 2)
    old_run(store, 2)  # the bucket's copy not converted yet
    latest = ckpt.find_latest([store, local], RUN)
    assert (latest.generation, latest.source) == (1, local)
    [line] = latest.messages()
    assert line.startswith("a copy of generation 2 is of the previous format (") and "python -m cloud.convert" in line
    assert latest.discard(RUN) == [] and ckpt.generations(store, RUN) == [1, 0]


# ---------------------------------------------------------------- the converter


def test_convert_rewrites_every_generation_newest_first(store: Storage) -> None:
    old_run(store, 3)
    lines, complete = convert.convert(store, RUN)
    assert complete and lines == [f"generation {g} converted (2 tensors)" for g in (3, 2, 1)]
    for generation in range(3):
        loaded = ckpt.load(store, RUN, generation)
        original = sample_checkpoint(generation)
        assert_bit_equal(loaded.tensors, original.tensors)
        assert (loaded.meta, loaded.blobs) == (original.meta, original.blobs)
        assert not store.exists(f"{ckpt.generation_prefix(RUN, generation)}/tensors.pt")
    assert ckpt.find_latest([store], RUN).generation == 2
    assert convert.convert(store, RUN) == ([f"generation {g} is already in {ckpt.FORMAT}" for g in (3, 2, 1)], True)


def test_convert_refuses_a_torch_older_than_2_10(store: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    old_run(store, 1)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu121")
    with pytest.raises(UserError, match=r"torch 2.9.1\+cu121 cannot read old checkpoints safely"):
        convert.convert(store, RUN)
    assert ckpt.read_manifest(store, RUN, 0, previous=True)["format"] == ckpt.PREVIOUS_FORMAT


class _TouchFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.path}'",)


def test_convert_never_runs_a_pickle_payload(store: Storage, tmp_path: Path) -> None:
    saved(store, 2)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"agent.w": _TouchFile(marker)}, buffer)
    downgrade(store, RUN, 1, payload=buffer.getvalue())
    downgrade(store, RUN, 0)
    lines, complete = convert.convert(store, RUN)
    assert not complete and not marker.exists()
    assert lines[0].startswith("generation 2 not converted: ") and "gen-000001/tensors.pt refused" in lines[0]
    assert lines[1] == "generation 1 converted (2 tensors)"
    assert ckpt.read_manifest(store, RUN, 1, previous=True)["format"] == ckpt.PREVIOUS_FORMAT  # left as it was


def test_convert_refuses_a_dtype_the_format_does_not_take(tmp_path: Path) -> None:
    store = saved(LocalStorage(tmp_path), 1)
    buffer = io.BytesIO()
    torch.save({"agent.w": torch.zeros(2, dtype=torch.complex64)}, buffer)
    downgrade(store, RUN, 0, payload=buffer.getvalue())
    [line], complete = convert.convert(store, RUN)
    assert not complete and line.startswith("generation 1 not converted: ") and "dtype torch.complex64" in line


def test_the_command_line_says_one_line_per_generation(tmp_path: Path, capsys: Any) -> None:
    old_run(LocalStorage(tmp_path), 2)
    assert convert.main([str(tmp_path), RUN]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "generation 2 converted (2 tensors)",
        "generation 1 converted (2 tensors)",
    ]
    assert convert.main([str(tmp_path), "missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpointed generation of run 'missing'") and err.count("\n") == 1


# ---------------------------------------------------------------- a whole run


def test_an_old_run_is_refused_by_resume_then_converted_and_resumed_exactly(
    tiny_config: TinyConfig, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    straight = train(tiny_config({**RICH, "train.generations": 3, "run.name": "straight"}))
    stopped = tiny_config({**RICH, "train.generations": 2, "run.name": "stopped"})
    train(stopped)
    local = LocalStorage(stopped.run.run_dir)
    for generation in ckpt.generations(local, "stopped"):
        downgrade(local, "stopped", generation)
    refused = run_cli("--resume", "stopped", "--run-dir", stopped.run.run_dir, "--generations", "3")
    assert refused.returncode == 2
    [line] = refused.stderr.splitlines()
    assert line.startswith("error: no verified checkpoint") and "python -m cloud.convert" in line
    assert ckpt.generations(local, "stopped") == [1, 0]  # nothing deleted
    assert convert.convert(local, "stopped")[1]
    resumed = resume(stopped, extra={"train.generations": 3})
    assert_same_run(straight, resumed)
