"""The background uploader, local disk to a second local location (the same code serves S3 and
GCS; tests/training/test_checkpoint_backends.py runs it against real servers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cloud import checkpoint as ckpt
from cloud.checkpoint import Checkpoint
from cloud.storage import LocalStorage
from cloud.upload import Uploader

RUN = "run"


def sample(generation: int, shared: dict[str, ckpt.BlobRef] | None = None) -> Checkpoint:
    import torch

    blobs: dict[str, bytes | ckpt.BlobRef] = {"replay/00000": b"old rows", "replay/00001": b"rows %d" % generation}
    if shared:
        blobs.update(shared)
    return Checkpoint({"w": torch.full((3,), float(generation))}, {"generation": generation}, blobs)


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "local")


@pytest.fixture
def remote(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "remote")


def make_uploader(local: LocalStorage, remote: LocalStorage, **kwargs: object) -> Uploader:
    options: dict = {"keep": 3, "keep_every": 0, "max_backoff_s": 0.05, **kwargs}
    return Uploader(local, remote, RUN, **options)


def commit(local: LocalStorage, uploader: Uploader | None, generation: int) -> dict[str, ckpt.BlobRef]:
    refs = ckpt.save(local, RUN, generation, sample(generation))
    if uploader is not None:
        uploader.submit(generation)
    return refs


def test_committed_generations_reach_the_remote_and_verify_there(local: LocalStorage, remote: LocalStorage) -> None:
    uploader = make_uploader(local, remote)
    for generation in range(2):
        commit(local, uploader, generation)
    assert uploader.wait(10)
    status = uploader.status()
    assert (status.pending, status.uploaded, status.error, status.fatal) == ([], 1, "", "")
    assert ckpt.generations(remote, RUN) == [1, 0]
    assert ckpt.load(remote, RUN, 1).blobs == ckpt.load(local, RUN, 1).blobs
    assert remote.read(f"{RUN}/LATEST") == b"gen-000001"
    uploader.close()


def test_log_files_are_uploaded_up_to_their_last_complete_line(
    local: LocalStorage, remote: LocalStorage, tmp_path: Path
) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"generation": 0}\n{"generation": 1')  # the writer is mid-line
    uploader = make_uploader(local, remote, log_files=lambda: [log, tmp_path / "absent.jsonl"])
    commit(local, uploader, 0)
    assert uploader.wait(10)
    assert remote.read(f"{RUN}/logs/metrics.jsonl") == b'{"generation": 0}\n'
    uploader.close()


def test_blobs_the_remote_holds_are_not_uploaded_again(local: LocalStorage, remote: LocalStorage) -> None:
    uploader = make_uploader(local, remote)
    refs = commit(local, uploader, 0)
    assert uploader.wait(10)
    old_rows = remote.root / RUN / refs["replay/00000"].key
    first_write = old_rows.stat().st_mtime_ns
    ckpt.save(local, RUN, 1, sample(1, shared={"replay/00000": refs["replay/00000"]}))
    uploader.submit(1)
    assert uploader.wait(10)
    assert old_rows.stat().st_mtime_ns == first_write
    assert ckpt.load(remote, RUN, 1).blobs["replay/00000"] == b"old rows"
    uploader.close()


def test_an_unreachable_remote_delays_uploads_and_they_catch_up(local: LocalStorage, remote: LocalStorage) -> None:
    remote.root.parent.mkdir(parents=True, exist_ok=True)
    remote.root.write_text("not a folder: every write under it fails")  # an unmounted network path
    uploader = make_uploader(local, remote)
    for generation in range(2):
        commit(local, uploader, generation)  # local commits go on
    assert not uploader.wait(0.5)
    status = uploader.status()
    assert status.pending == [0, 1]
    assert "cannot write" in status.error and status.oldest_pending_s > 0
    remote.root.unlink()  # back again
    assert uploader.wait(10), uploader.status()
    assert ckpt.generations(remote, RUN) == [1, 0]
    assert uploader.status().error == ""
    uploader.close()


def test_a_generation_pruned_locally_before_its_upload_is_skipped(local: LocalStorage, remote: LocalStorage) -> None:
    remote.root.parent.mkdir(parents=True, exist_ok=True)
    remote.root.write_text("down")
    uploader = make_uploader(local, remote, keep=1)
    for generation in range(3):
        commit(local, uploader, generation)
        with uploader.lock:
            ckpt.prune(local, RUN, 1, protect=() if uploader.in_flight is None else (uploader.in_flight,))
    remote.root.unlink()
    assert uploader.wait(10)
    assert ckpt.generations(remote, RUN)[0] == 2
    uploader.close()


def test_remote_retention_keeps_the_newest_and_every_mth(local: LocalStorage, remote: LocalStorage) -> None:
    uploader = make_uploader(local, remote, keep=2, keep_every=3)
    for generation in range(7):
        commit(local, uploader, generation)
        assert uploader.wait(10)
    assert ckpt.generations(remote, RUN) == [6, 5, 2]
    kept = {key for g in (6, 5, 2) for key, _ in ckpt.manifest_objects(ckpt.read_manifest(remote, RUN, g), RUN)}
    assert set(remote.list(f"{RUN}/objects")) == kept
    uploader.close()


def test_a_retried_commit_with_the_same_manifest_is_accepted(local: LocalStorage, remote: LocalStorage) -> None:
    commit(local, None, 0)
    shutil.copytree(local.root, remote.root)  # as if the response to the first commit was lost
    uploader = make_uploader(local, remote)
    uploader.submit(0)
    assert uploader.wait(10)
    assert uploader.status().fatal == "" and uploader.status().uploaded == 0
    uploader.close()


def test_another_writers_generation_is_never_overwritten(local: LocalStorage, remote: LocalStorage) -> None:
    other = LocalStorage(remote.root)
    ckpt.save(other, RUN, 0, sample(5))  # a second trainer with the same run name got there first
    theirs = other.read(ckpt.manifest_key(RUN, 0))
    uploader = make_uploader(local, remote)
    commit(local, uploader, 0)
    assert not uploader.wait(10)
    assert "committed by another writer" in uploader.status().fatal
    assert other.read(ckpt.manifest_key(RUN, 0)) == theirs
    uploader.close()


def test_a_damaged_local_copy_is_not_uploaded(local: LocalStorage, remote: LocalStorage) -> None:
    refs = commit(local, None, 0)
    (local.root / RUN / refs["replay/00001"].key).write_bytes(b"flipped")
    uploader = make_uploader(local, remote)
    uploader.submit(0)
    assert uploader.wait(10)
    assert ckpt.generations(remote, RUN) == []
    assert "does not match its manifest" in uploader.status().error
    uploader.close()
    from training.report import _checkpoint_line

    status = uploader.status()
    record = {"checkpoint_s": 0.1, "upload_pending": len(status.pending), "upload_lag_s": 0.0}
    line = _checkpoint_line({**record, "upload_error": status.error})
    assert "up to date" not in line and "not uploaded" in line  # the skipped generation is said


def test_close_leaves_pending_generations_local(local: LocalStorage, remote: LocalStorage) -> None:
    remote.root.parent.mkdir(parents=True, exist_ok=True)
    remote.root.write_text("down")
    uploader = make_uploader(local, remote)
    commit(local, uploader, 0)
    uploader.close()
    assert uploader.status().pending == [0]
    assert json.loads(local.read(ckpt.manifest_key(RUN, 0)))["generation"] == 0


def test_finishing_uploads_when_the_last_one_lands_right_after_the_wait(
    local: LocalStorage, remote: LocalStorage
) -> None:
    from types import SimpleNamespace

    from training.trainer import Trainer

    uploader = make_uploader(local, remote)
    commit(local, uploader, 0)
    assert uploader.wait(10)
    waits = iter([False, False])  # pending at the first check and when the wait gave up; done just after
    uploader.wait = lambda timeout_s: next(waits)  # type: ignore[method-assign]
    trainer = SimpleNamespace(uploader=uploader, cfg=SimpleNamespace(run=SimpleNamespace(checkpoint_uri="x")))
    try:
        assert Trainer.finish_uploads(trainer, 0.1) == ""  # type: ignore[arg-type]
    finally:
        uploader.close()
