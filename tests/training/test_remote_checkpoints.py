"""Checkpoints at ``run.checkpoint_uri``: the same suite over a second local folder, a real S3
server (moto) and a real GCS emulator, each started by the test (tests/cloud/servers.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cloud import checkpoint as ckpt
from cloud.storage import Storage, open_storage
from config import Config, UserError
from tests.cloud.servers import Backend, backend_fixture  # noqa: F401
from tests.training.test_trainer import RICH, TinyConfig, assert_same_run, metrics, train
from training import runs
from training.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "remote"
LEASE_S = 2.0
"""A short claim on the run for trainers that are killed, so that the next one may take over soon."""


def config(tiny_config: TinyConfig, backend: Backend, **extra: Any) -> Config:
    return tiny_config(
        {**RICH, "run.name": NAME, "run.checkpoint_uri": backend.uri, "run.upload_retry_max_s": 0.2, **extra}
    )


def run_and_upload(cfg: Config) -> Trainer:
    """Train to ``train.generations`` and wait for the uploads, as main.py does."""
    trainer = runs.start(cfg)
    try:
        trainer.train()
        assert trainer.finish_uploads(120) == ""
    finally:
        trainer.close()
    return trainer


def resume_from_remote_only(cfg: Config, backend: Backend, **extra: Any) -> Trainer:
    """A new machine: the local run folder is gone; only the checkpoint URI is known."""
    shutil.rmtree(Path(cfg.run.run_dir) / NAME)
    trainer = runs.resume(cfg.run.run_dir, "", {"extra": {"run.checkpoint_uri": backend.uri, **extra}})
    try:
        trainer.train()
        assert trainer.finish_uploads(120) == ""
    finally:
        trainer.close()
    return trainer


def remote(backend: Backend) -> Storage:
    return open_storage(backend.uri)


def object_key(store: Storage, generation: int, name: str) -> str:
    """Where a generation's object ``name`` (tensors.safetensors, state.json) is stored."""
    entry = ckpt.read_manifest(store, NAME, generation)["objects"][name]
    return f"{NAME}/{entry.get('key', f'gen-{generation:06d}/{name}')}"


def flip_a_byte(storage: Storage, key: str) -> None:
    blob = bytearray(storage.read(key))
    blob[len(blob) // 2] ^= 0x01
    storage.write(key, bytes(blob))


# ---------------------------------------------------------------- round trip and exact resume


def test_every_generation_reaches_the_remote_and_verifies_there(tiny_config: TinyConfig, backend: Backend) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 3})
    trainer = run_and_upload(cfg)
    store = remote(backend)
    assert ckpt.generations(store, NAME) == [2, 1, 0]
    local_copy = ckpt.load(trainer.storage, NAME, 2)
    remote_copy = ckpt.load(store, NAME, 2)
    assert remote_copy.blobs == local_copy.blobs and remote_copy.meta == local_copy.meta
    assert json.loads(store.read(f"{NAME}/run.json"))["config"]["run"]["checkpoint_uri"] == backend.uri
    assert [json.loads(line)["generation"] for line in store.read(f"{NAME}/logs/metrics.jsonl").splitlines()] == [
        0,
        1,
        2,
    ]


def test_a_run_resumed_from_the_remote_alone_equals_the_uninterrupted_run(
    tiny_config: TinyConfig, backend: Backend, tmp_path: Path
) -> None:
    straight = train(tiny_config({**RICH, "train.generations": 3, "run.name": "straight"}))
    cfg = config(tiny_config, backend, **{"train.generations": 2})
    run_and_upload(cfg)
    resumed = resume_from_remote_only(cfg, backend, **{"train.generations": 3})
    assert_same_run(straight, resumed)
    assert [m["generation"] for m in metrics(resumed.cfg)] == [0, 1, 2]  # the log came back from the remote
    assert ckpt.generations(remote(backend), NAME)[0] == 2


def test_status_lists_the_runs_at_the_remote(tiny_config: TinyConfig, backend: Backend) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 2})
    run_and_upload(cfg)
    shutil.rmtree(Path(cfg.run.run_dir) / NAME)
    [found] = runs.list_runs(cfg.run.run_dir, backend.uri)
    assert (found.name, found.local, found.remote) == (NAME, [], [1, 0])


# ---------------------------------------------------------------- outages


def test_an_outage_of_two_generations_delays_uploads_but_not_training(
    tiny_config: TinyConfig, backend: Backend
) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 4})
    trainer = runs.start(cfg)
    try:
        trainer.run_generation(0)
        assert trainer.uploader is not None and trainer.uploader.wait(60)
        backend.stop()
        for generation in (1, 2):
            trainer.run_generation(generation)  # local commits go on
        assert ckpt.generations(trainer.storage, NAME)[:2] == [2, 1]
        assert trainer.uploader.status().pending[-1] == 2
        assert trainer._checkpoint_record()["upload_pending"] >= 1
        backend.start()
        trainer.run_generation(3)
        assert trainer.finish_uploads(120) == "", trainer.uploader.status()
    finally:
        trainer.close()
    store = remote(backend)
    assert ckpt.generations(store, NAME)[0] == 3
    for generation in ckpt.generations(store, NAME):
        ckpt.load(store, NAME, generation)  # every committed generation verifies


def test_a_bad_location_fails_before_training(tiny_config: TinyConfig, backend: Backend) -> None:
    backend.stop()
    cfg = config(tiny_config, backend, **{"train.generations": 1})
    started = time.monotonic()
    with pytest.raises(UserError) as refused:
        runs.start(cfg)
    assert time.monotonic() - started < 15, "an unreachable location must fail within seconds"
    assert "\n" not in str(refused.value) and ("cannot" in str(refused.value)), refused.value
    assert not (Path(cfg.run.run_dir) / NAME / "gen-000000").exists()


def test_uploads_still_pending_at_the_end_are_reported(tiny_config: TinyConfig, backend: Backend) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 1})
    trainer = runs.start(cfg)
    try:
        backend.stop()
        trainer.train()
        left = trainer.finish_uploads(0.5)
    finally:
        closing = time.monotonic()
        trainer.close()  # releasing the writer claim must not wait out the client's long retry deadline
        closed_s = time.monotonic() - closing
        backend.start()
    assert closed_s < 30, closed_s  # 80 s on GCS when the claim used the default retry
    assert left.startswith(f"generation 1 is committed in {trainer.storage.url(NAME)} but not in {backend.uri}")
    assert f"python main.py --resume {NAME}` finishes the upload" in left
    resumed = runs.resume(cfg.run.run_dir, NAME, {})  # catches up: nothing to train, only to upload
    try:
        resumed.train()
        assert resumed.finish_uploads(120) == ""
    finally:
        resumed.close()
    assert ckpt.generations(remote(backend), NAME) == [0]


# ---------------------------------------------------------------- damaged remote checkpoints


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_newest_remote_generation_is_rejected_and_the_previous_one_resumed(
    tiny_config: TinyConfig, backend: Backend, damage: str, capsys: Any
) -> None:
    straight = train(tiny_config({**RICH, "train.generations": 3, "run.name": "straight"}))
    cfg = config(tiny_config, backend, **{"train.generations": 3})
    run_and_upload(cfg)
    store = remote(backend)
    key = object_key(store, 2, "tensors.safetensors")
    if damage == "flip":
        flip_a_byte(store, key)
    elif damage == "truncate":
        store.write(key, store.read(key)[:-10])
    else:
        store.delete(key)
    capsys.readouterr()
    resumed = resume_from_remote_only(cfg, backend)  # reruns generation 3 from generation 2
    out = capsys.readouterr().out
    assert "generation 3 rejected" in out and "tensors.safetensors" in out
    assert "resuming run 'remote' after generation 2" in out
    assert_same_run(straight, resumed)
    assert ckpt.load(store, NAME, 2).meta["counters"] == ckpt.load(resumed.storage, NAME, 2).meta["counters"]


def test_retention_on_the_remote_keeps_the_newest_and_every_mth(tiny_config: TinyConfig, backend: Backend) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 5, "run.keep_checkpoints": 2, "run.keep_every": 2})
    run_and_upload(cfg)
    store = remote(backend)
    assert ckpt.generations(store, NAME) == [4, 3, 1]  # generations 5 and 4, and generation 2 (every 2nd)
    referenced = {
        key
        for generation in (4, 3, 1)
        for key, _ in ckpt.manifest_objects(ckpt.read_manifest(store, NAME, generation), NAME)
    }
    assert set(store.list(f"{NAME}/{ckpt.OBJECTS}")) == referenced


# ---------------------------------------------------------------- foreign and malicious checkpoints


def test_a_checkpoint_of_another_config_is_refused(tiny_config: TinyConfig, backend: Backend) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 1})
    run_and_upload(cfg)
    store = remote(backend)
    key = object_key(store, 0, "state.json")
    state = json.loads(store.read(key))
    state["config"]["agent"]["gamma"] = 0.5  # a checkpoint whose meaning differs from its hash
    rewrite_with_manifest(store, 0, "state.json", json.dumps(state).encode())
    shutil.rmtree(Path(cfg.run.run_dir) / NAME)
    with pytest.raises(UserError, match="belongs to another config"):
        runs.resume(cfg.run.run_dir, NAME, {"extra": {"run.checkpoint_uri": backend.uri}})


def test_a_changed_config_is_refused_naming_the_key(tiny_config: TinyConfig, backend: Backend) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 1})
    run_and_upload(cfg)
    shutil.rmtree(Path(cfg.run.run_dir) / NAME)
    with pytest.raises(UserError, match="changed config: agent.gamma"):
        runs.resume(
            cfg.run.run_dir, NAME, {"extra": {"run.checkpoint_uri": backend.uri}, "overrides": ["agent.gamma=0.97"]}
        )


class _TouchFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.path}'",)


def test_a_checkpoint_crafted_to_execute_code_is_refused(
    tiny_config: TinyConfig, backend: Backend, tmp_path: Path, capsys: Any
) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 2})
    run_and_upload(cfg)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"agent.w": _TouchFile(marker)}, buffer)
    rewrite_with_manifest(remote(backend), 1, "tensors.safetensors", buffer.getvalue())
    capsys.readouterr()
    resumed = resume_from_remote_only(cfg, backend)
    assert "tensors.safetensors refused: not a safetensors file" in capsys.readouterr().out
    assert resumed.counters.generation == 2  # generation 2 rerun from generation 1
    assert not marker.exists()


def rewrite_with_manifest(store: Storage, generation: int, name: str, data: bytes) -> None:
    """Replace an object and make the manifest vouch for it (someone who controls the bucket)."""
    prefix = ckpt.generation_prefix(NAME, generation)
    store.write(object_key(store, generation, name), data)
    manifest = json.loads(store.read(f"{prefix}/{ckpt.MANIFEST}"))
    manifest["objects"][name].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    store.write(f"{prefix}/{ckpt.MANIFEST}", json.dumps(manifest).encode())


# ---------------------------------------------------------------- SIGKILL in the middle of an upload


def _train_subprocess(run_dir: Path, uri: str, generations: int) -> subprocess.Popen[str]:
    args = [
        *("--preset", "debug", "--run-dir", str(run_dir), "--name", NAME, "--checkpoint-uri", uri),
        *("--generations", str(generations), "--set", "run.tensorboard=false", "--set", "run.progress=false"),
        *("--set", "run.replay_shard_mb=0.001"),  # many small shards: each generation uploads dozens of objects
        *("--set", f"run.writer_lease_s={LEASE_S}"),
    ]
    return subprocess.Popen(
        [sys.executable, "main.py", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _uploading(store: Storage) -> bool:
    """Blobs on the remote that no manifest references yet: a generation's upload is under way."""
    generations = ckpt.generations(store, NAME)
    referenced = set()
    for generation in generations:
        try:
            referenced |= {f"{NAME}/{r['key']}" for r in ckpt.read_manifest(store, NAME, generation)["shared"].values()}
        except ckpt.CheckpointError:
            return False  # deleted by retention while we read
    return bool(generations) and bool(set(store.list(f"{NAME}/{ckpt.OBJECTS}")) - referenced)


def test_sigkill_in_the_middle_of_an_upload_then_resume(backend: Backend, tmp_path: Path) -> None:
    process = _train_subprocess(tmp_path / "killed", backend.uri, generations=30)
    store = remote(backend)
    deadline = time.monotonic() + 120
    try:
        while not _uploading(store):
            assert process.poll() is None, f"finished before an upload was caught: {process.stderr}"
            assert time.monotonic() < deadline, "no upload in progress was seen"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(30)
    newest = ckpt.generations(store, NAME)[0]
    for generation in ckpt.generations(store, NAME):
        ckpt.load(store, NAME, generation)  # no half generation: every manifest verifies
    time.sleep(LEASE_S)  # the killed trainer's claim on the run expires

    # A new machine resumes from the bucket alone and finishes the run.
    finished = subprocess.run(
        [
            sys.executable,
            "main.py",
            *("--resume", NAME, "--run-dir", str(tmp_path / "new-machine"), "--checkpoint-uri", backend.uri),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    assert f"resuming run '{NAME}' after generation {newest + 1}" in finished.stdout
    straight = _train_subprocess(tmp_path / "straight", str(tmp_path / "straight-remote"), generations=30)
    _, stderr = straight.communicate(timeout=300)
    assert straight.returncode == 0, stderr
    a = ckpt.load(open_storage(str(tmp_path / "straight")), NAME, 29)
    b = ckpt.load(open_storage(str(tmp_path / "new-machine")), NAME, 29, fallbacks=[store])
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.blobs == b.blobs
    assert a.meta["counters"]["best_fitness"] == b.meta["counters"]["best_fitness"]


# ---------------------------------------------------------------- issue 12: what a resume may delete, records, logs


def test_a_damaged_local_manifest_never_costs_the_remote_generation(
    tiny_config: TinyConfig, backend: Backend, capsys: Any
) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 3})
    run_and_upload(cfg)
    local_manifest = Path(cfg.run.run_dir) / NAME / "gen-000002" / ckpt.MANIFEST
    local_manifest.write_bytes(local_manifest.read_bytes()[:50])  # truncated
    with pytest.raises(UserError, match="changed config: agent.gamma"):  # a resume refused for another reason
        runs.resume(cfg.run.run_dir, NAME, {"overrides": ["agent.gamma=0.97"]})
    assert local_manifest.exists(), "nothing is deleted before the resume is accepted"
    store = remote(backend)
    assert ckpt.generations(store, NAME)[0] == 2 and ckpt.load(store, NAME, 2).meta["counters"]["generation"] == 3
    capsys.readouterr()
    trainer = runs.resume(cfg.run.run_dir, NAME, {"extra": {"train.generations": 4}})
    try:
        trainer.train()
        assert trainer.finish_uploads(120) == ""
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert "resuming run 'remote' after generation 3" in out and "a copy of generation 3 is damaged" in out
    assert ckpt.generations(store, NAME)[:2] == [3, 2]
    for generation in ckpt.generations(store, NAME):
        ckpt.load(store, NAME, generation)


def test_a_checkpoint_uri_added_on_resume_gets_the_run_record(tiny_config: TinyConfig, backend: Backend) -> None:
    cfg = tiny_config({**RICH, "run.name": NAME, "train.generations": 1})  # no checkpoint URI at first
    train(cfg)
    trainer = runs.resume(cfg.run.run_dir, NAME, {"extra": {"train.generations": 2, "run.checkpoint_uri": backend.uri}})
    try:
        trainer.train()
        assert trainer.finish_uploads(120) == ""
    finally:
        trainer.close()
    assert json.loads(remote(backend).read(f"{NAME}/run.json"))["config"]["run"]["name"] == NAME
    shutil.rmtree(Path(cfg.run.run_dir) / NAME)
    [found] = runs.list_runs(cfg.run.run_dir, backend.uri)
    assert (found.name, found.remote) == (NAME, [1, 0])


def test_remote_logs_are_merged_by_generation_never_replaced_by_a_shorter_history(
    tiny_config: TinyConfig, backend: Backend, tmp_path: Path
) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 2})
    run_and_upload(cfg)
    old_folder = tmp_path / "old-machine"
    shutil.copytree(Path(cfg.run.run_dir) / NAME, old_folder)  # machine A's folder: generations 1-2
    resume_from_remote_only(cfg, backend, **{"train.generations": 4})  # machine B goes on to generation 4
    shutil.rmtree(Path(cfg.run.run_dir) / NAME)
    shutil.copytree(old_folder, Path(cfg.run.run_dir) / NAME)  # machine A comes back with its old folder
    trainer = runs.resume(cfg.run.run_dir, NAME, {"extra": {"train.generations": 5}})
    try:
        trainer.train()
        assert trainer.finish_uploads(120) == ""
    finally:
        trainer.close()
    store = remote(backend)
    for log in ("metrics.jsonl", "lineage.jsonl"):
        lines = store.read(f"{NAME}/logs/{log}").splitlines()
        assert sorted({json.loads(line)["generation"] for line in lines}) == [0, 1, 2, 3, 4], log
    assert [m["generation"] for m in metrics(trainer.cfg)] == [0, 1, 2, 3, 4]


def test_a_second_trainer_on_the_same_run_stops_before_writing_anything(
    tiny_config: TinyConfig, backend: Backend, tmp_path: Path
) -> None:
    cfg = config(tiny_config, backend, **{"train.generations": 3})
    first = runs.start(cfg)
    try:
        first.run_generation(0)
        assert first.uploader is not None and first.uploader.wait(60)
        store = remote(backend)
        before = {key: store.read(key) for key in store.list(NAME) if not key.endswith("/WRITER")}
        other_dir = str(tmp_path / "second-machine")
        with pytest.raises(UserError) as resumed:  # a second machine resumes the run while it is alive
            runs.resume(other_dir, NAME, {"extra": {"run.checkpoint_uri": backend.uri}})
        with pytest.raises(UserError) as started:  # or starts a run of the same name
            runs.start(config(tiny_config, backend, **{"run.run_dir": other_dir}))
        after = {key: store.read(key) for key in store.list(NAME) if not key.endswith("/WRITER")}
        assert after == before, "the second trainer wrote nothing"
        assert "being written by another trainer" in str(resumed.value) and "\n" not in str(resumed.value)
        assert "already exists" in str(started.value) and "\n" not in str(started.value)
        for generation in (1, 2):
            first.run_generation(generation)
        assert first.finish_uploads(120) == ""
    finally:
        first.close()
    assert ckpt.generations(store, NAME) == [2, 1, 0]
    for generation in ckpt.generations(store, NAME):
        ckpt.load(store, NAME, generation)  # every generation of the first trainer verifies
    assert not store.exists(f"{NAME}/WRITER")  # released: a later resume may go on at once
