"""Checkpoint-layer guarantees that do not depend on the backend, over a local folder, a moto S3
server and a GCS emulator (tests/cloud/servers.py): damaged copies, listings that miss a commit,
manifests naming foreign objects, leftovers, damaged manifests during garbage collection, and
storage checks that run at the same time."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from cloud import checkpoint as ckpt
from cloud.checkpoint import CheckpointError
from cloud.storage import LocalStorage, Storage, StorageError, check_writable, open_storage
from cloud.upload import Uploader
from tests.cloud.servers import Backend, backend_fixture  # noqa: F401
from tests.cloud.test_checkpoint import sample_checkpoint

RUN = "run"


def saved(storage: Storage, generations: int) -> Storage:
    for generation in range(generations):
        ckpt.save(storage, RUN, generation, sample_checkpoint(generation))
    return storage


def manifest_of(storage: Storage, generation: int) -> dict:
    return json.loads(storage.read(ckpt.manifest_key(RUN, generation)))


def put_manifest(storage: Storage, generation: int, manifest: dict) -> None:
    storage.write(ckpt.manifest_key(RUN, generation), json.dumps(manifest).encode())


def own_key(storage: Storage, generation: int, name: str) -> str:
    """Where a generation's own object is: in its folder locally, content-addressed elsewhere."""
    entry = manifest_of(storage, generation)["objects"][name]
    return f"{RUN}/{entry.get('key', f'gen-{generation:06d}/{name}')}"


@pytest.fixture
def store(backend: Backend) -> Storage:
    return open_storage(backend.uri)


# ---------------------------------------------------------------- damaged copies (defect 1)


def test_a_damaged_copy_of_a_manifest_does_not_reject_the_generation(store: Storage, tmp_path: Path) -> None:
    local = saved(LocalStorage(tmp_path / "local"), 3)
    saved(store, 3)
    local.write(ckpt.manifest_key(RUN, 2), local.read(ckpt.manifest_key(RUN, 2))[:40])  # truncated
    latest = ckpt.find_latest([local, store], RUN)
    assert (latest.generation, latest.source) == (2, store)
    assert latest.rejected() == [] and "a copy of generation 3 is damaged" in latest.messages()[0]
    assert [(r.generation, r.storage) for r in latest.discard(RUN)] == [(2, local)]
    assert ckpt.load(store, RUN, 2).meta["generation"] == 2  # the intact copy is untouched


def test_a_damaged_object_on_either_side_is_taken_from_the_other(store: Storage, tmp_path: Path) -> None:
    local = saved(LocalStorage(tmp_path / "local"), 2)
    saved(store, 2)
    local.write(own_key(local, 1, "tensors.safetensors"), b"damaged")
    store.write(own_key(store, 1, "state.json"), b"damaged")
    for order in ([local, store], [store, local]):
        latest = ckpt.find_latest(order, RUN)
        assert latest.generation == 1 and latest.failed == []


# ---------------------------------------------------------------- a listing that misses a commit (defect 2)


def test_only_examined_generations_are_discarded(store: Storage) -> None:
    saved(store, 3)
    store.write(own_key(store, 2, "tensors.safetensors"), b"damaged")
    latest = ckpt.find_latest([store], RUN)
    assert latest.generation == 1
    ckpt.save(store, RUN, 3, sample_checkpoint(3))  # committed after the listing (or missing from a lagging one)
    assert [r.generation for r in latest.discard(RUN)] == [2]
    assert ckpt.generations(store, RUN) == [3, 1, 0]
    assert ckpt.load(store, RUN, 3).meta["generation"] == 3


# ---------------------------------------------------------------- object names a manifest may use (defect 12)


@pytest.mark.parametrize(
    ("where", "name"),
    [("objects", "../../../../secret.txt"), ("objects", "extra.bin"), ("shared", "../x"), ("shared", "a/../../b")],
)
def test_a_manifest_naming_objects_the_format_does_not_define_is_refused(store: Storage, where: str, name: str) -> None:
    saved(store, 1)
    manifest = manifest_of(store, 0)
    manifest[where][name] = dict(manifest["objects"]["state.json"])
    if where == "objects":
        manifest["objects"][name].pop("key", None)  # a first-layout entry: gen-000000/<name>
    put_manifest(store, 0, manifest)
    with pytest.raises(CheckpointError, match="refused|malformed"):
        ckpt.load(store, RUN, 0)


def test_the_uploader_copies_nothing_a_manifest_names_outside_the_run(store: Storage, tmp_path: Path) -> None:
    local = saved(LocalStorage(tmp_path / "local" / "runs"), 1)
    secret = tmp_path / "local" / "secret.txt"
    secret.write_bytes(b"private")
    manifest = manifest_of(local, 0)
    manifest["objects"] = {"../../../secret.txt": {"size": 7, "sha256": ckpt.hashlib.sha256(b"private").hexdigest()}}
    put_manifest(local, 0, manifest)
    uploader = Uploader(local, store, RUN, keep=3, keep_every=0, max_backoff_s=0.05)
    try:
        uploader.submit(0)
        assert uploader.wait(10)
        assert "malformed" in uploader.status().error
    finally:
        uploader.close()
    assert all(store.read(key) != b"private" for key in store.list(""))


# ---------------------------------------------------------------- retention (defects 9 and 10)


def test_a_damaged_manifest_is_reported_and_protects_no_object(store: Storage) -> None:
    saved(store, 4)
    store.write(ckpt.manifest_key(RUN, 3), b"{damaged")
    problems: list[str] = []
    ckpt.prune(store, RUN, keep=2, problems=problems)
    assert ckpt.generations(store, RUN) == [3, 2]
    assert len(problems) == 1 and "gen-000003/MANIFEST.json is not valid JSON" in problems[0]
    kept = {key for key, _ in ckpt.manifest_objects(manifest_of(store, 2), RUN) if "/objects/" in key}
    assert set(store.list(f"{RUN}/{ckpt.OBJECTS}")) == kept  # garbage collection went on


def test_leftover_generation_folders_without_a_manifest_are_removed(store: Storage) -> None:
    saved(store, 2)
    store.write(f"{RUN}/gen-000005/tensors.safetensors", b"an aborted first-layout attempt")
    store.write(f"{RUN}/gen-000000/state.json", b"left by a prune cut short")
    store.delete(ckpt.manifest_key(RUN, 0))
    ckpt.prune(store, RUN, keep=3)
    assert {key.split("/")[1] for key in store.list(RUN) if "/gen-" in key} == {"gen-000001"}
    assert ckpt.load(store, RUN, 1).meta["generation"] == 1


# ---------------------------------------------------------------- storage checks at the same time (defect 7)


def test_trainers_checking_one_location_at_the_same_time_all_pass(backend: Backend) -> None:
    failures: list[str] = []
    barrier = threading.Barrier(8)

    def check() -> None:
        storage = open_storage(backend.uri)
        barrier.wait()
        for _ in range(3):
            try:
                check_writable(storage, ".evorl-check")
            except StorageError as err:
                failures.append(str(err))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert open_storage(backend.uri).list(".evorl-check") == []


# ---------------------------------------------------------------- local paths


def test_a_parent_folder_named_partial_does_not_hide_checkpoints(tmp_path: Path) -> None:
    storage = saved(LocalStorage(tmp_path / "data.partial" / "runs"), 3)
    assert ckpt.generations(storage, RUN) == [2, 1, 0]
    ckpt.prune(storage, RUN, keep=1)
    assert ckpt.generations(storage, RUN) == [2]


# ---------------------------------------------------------------- a second writer (defect 3)


def test_a_second_writer_never_alters_a_committed_generation(store: Storage, tmp_path: Path) -> None:
    first = saved(store, 1)  # the first trainer committed generation 1 there
    committed = {key: first.read(key) for key in first.list(RUN)}
    local = LocalStorage(tmp_path / "second")
    ckpt.save(local, RUN, 0, sample_checkpoint(5))  # the second trainer's own generation 1
    uploader = Uploader(local, store, RUN, keep=3, keep_every=0, max_backoff_s=0.05)
    try:
        uploader.submit(0)
        assert not uploader.wait(10)
        assert "committed by another writer" in uploader.status().fatal
    finally:
        uploader.close()
    assert {key: store.read(key) for key in store.list(RUN)} == committed  # not one object written
    assert ckpt.load(store, RUN, 0).meta["generation"] == 0


def test_objects_of_two_writers_of_one_generation_never_share_a_key(store: Storage, backend: Backend) -> None:
    if backend.name == "gcs":
        pytest.skip("the GCS emulator ignores if_generation_match (the commit itself is not refused)")
    ckpt.save(store, RUN, 0, sample_checkpoint(0))
    before = {key: store.read(key) for key in store.list(RUN) if "/objects/" in key}
    with pytest.raises(StorageError):  # the commit is refused: the generation is taken
        ckpt.save(store, RUN, 0, sample_checkpoint(7))
    assert all(store.read(key) == data for key, data in before.items())
    assert ckpt.load(store, RUN, 0).meta["generation"] == 0


# ---------------------------------------------------------------- retention failures are shown (defect 8)


class _NoDeletes(LocalStorage):
    """A location that refuses deletes, as a bucket without delete permission or under a retention policy."""

    def delete(self, key: str) -> None:
        raise StorageError(f"access denied deleting {self.url(key)}")


def test_remote_retention_failures_are_shown_in_the_status(tmp_path: Path) -> None:
    from training.report import _checkpoint_line

    local, remote = LocalStorage(tmp_path / "local"), _NoDeletes(tmp_path / "remote")
    uploader = Uploader(local, remote, RUN, keep=1, keep_every=0, max_backoff_s=0.05)
    try:
        for generation in range(3):
            ckpt.save(local, RUN, generation, sample_checkpoint(generation))
            uploader.submit(generation)
            assert uploader.wait(10)
        status = uploader.status()
    finally:
        uploader.close()
    assert status.pending == [] and status.uploaded == 2
    assert "retention on" in status.error and "access denied" in status.error
    record = {"checkpoint_s": 0.1, "upload_pending": 0, "upload_lag_s": 0.0, "upload_error": status.error}
    line = _checkpoint_line(record)
    assert "up to date" not in line and "access denied" in line


def test_the_storage_check_says_when_create_only_writes_are_not_enforced(backend: Backend, capsys: object) -> None:
    check_writable(open_storage(backend.uri), ".evorl-check")
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    if backend.name == "gcs":  # the emulator ignores if_generation_match (a real bucket does not)
        assert "does not refuse to overwrite a create-only write" in err
    else:
        assert err == ""
    assert open_storage(backend.uri).list(".evorl-check") == []


def test_runs_are_found_from_one_level_of_listing(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.runs import _run_names

    storage = open_storage(backend.uri)
    saved(storage, 2)
    for name in ("a", "b"):
        storage.write(f"{name}/run.json", b"{}")
    storage.write("c/notes.txt", b"not a run")
    assert storage.folders("") == ["a", "b", "c", RUN]
    assert storage.folders(RUN) == ["gen-000000", "gen-000001", "objects"]

    def no_recursive_listing(prefix: str) -> list[str]:
        raise AssertionError(f"listed every key below {prefix!r}")

    monkeypatch.setattr(storage, "list", no_recursive_listing)
    assert _run_names(storage) == ["a", "b"]
