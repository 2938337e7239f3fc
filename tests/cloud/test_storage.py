from __future__ import annotations

from pathlib import Path

import pytest

from cloud import storage as storage_module
from cloud.storage import LocalStorage, StorageError, check_writable, open_storage


def test_write_read_exists_and_list(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write("run/b/x.bin", b"1")
    storage.write("run/a.bin", b"22")
    assert storage.read("run/a.bin") == b"22"
    assert storage.exists("run/b/x.bin") and not storage.exists("run/b")
    assert storage.list("run") == ["run/a.bin", "run/b/x.bin"]
    assert storage.list("nothing") == []


def test_write_replaces_atomically_without_leftovers(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write("k", b"old")
    storage.write("k", b"new")
    assert storage.read("k") == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_list_skips_unfinished_temporary_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write("run/done", b"x")
    (tmp_path / "run" / ".half.tmp-123").write_bytes(b"partial")
    assert storage.list("run") == ["run/done"]


def test_delete_removes_empty_folders_up_to_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    storage.write("run/gen/a", b"x")
    storage.write("run/keep", b"x")
    storage.delete("run/gen/a")
    assert not (tmp_path / "root" / "run" / "gen").exists()
    assert (tmp_path / "root" / "run" / "keep").exists()
    storage.delete("run/missing")  # deleting what is gone is fine


def test_a_write_survives_a_delete_removing_its_folder_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another trainer's delete can empty and remove the folder between a writer's mkdir and its
    write (the race behind concurrent storage checks); the write goes through, nothing is lost."""
    storage = LocalStorage(tmp_path)
    storage.write("check/other", b"x")
    real = storage_module._write_synced
    raced: list[Path] = []

    def after_the_other_delete(path: Path, data: bytes) -> None:
        if not raced:
            raced.append(path)
            storage.delete("check/other")  # the folder is empty now, so it goes too
            assert not (tmp_path / "check").exists()
        real(path, data)

    monkeypatch.setattr(storage_module, "_write_synced", after_the_other_delete)
    storage.write_new("check/mine", b"ok")
    assert raced and storage.read("check/mine") == b"ok"
    assert storage.list("check") == ["check/mine"]


def test_a_delete_leaves_a_folder_another_writer_is_filling(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write("check/mine", b"x")
    (tmp_path / "check" / ".other.tmp-1-2").write_bytes(b"half written")
    storage.delete("check/mine")
    storage.delete("check/mine")  # twice, as two deleters would: no error either time
    assert (tmp_path / "check" / ".other.tmp-1-2").exists()


def test_open_storage_serves_local_paths_and_file_uris(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    storage = open_storage(f"file://{tmp_path}")
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/runs", "unsupported storage URI"),
    ],
)
def test_open_storage_refuses_unserved_schemes(uri: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        open_storage(uri)


def test_check_writable_leaves_nothing_behind(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "runs")
    check_writable(storage, "run")
    assert storage.list("") == []


def test_check_writable_fails_early_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write to"):
        check_writable(LocalStorage(tmp_path / "file" / "runs"), "run")
