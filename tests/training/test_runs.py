"""Starting runs: thread setting, device resolution."""

from __future__ import annotations

import pytest
import torch

from config import UserError
from training import runs


def test_run_threads_sets_torch_intra_op_threads(tiny_config) -> None:
    before = torch.get_num_threads()
    try:
        trainer = runs.start(tiny_config({"run.threads": 2, "train.generations": 1}))
        assert torch.get_num_threads() == 2
        trainer.close()
    finally:
        torch.set_num_threads(before)


def test_cpu_device_resolves_and_cuda_without_cuda_is_a_user_error() -> None:
    assert runs.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            runs.resolve_device("cuda")


def test_a_resume_remembers_the_checkpoint_uri_it_last_went_on_with(tiny_config, tmp_path) -> None:
    from cloud import checkpoint as ckpt
    from cloud.storage import LocalStorage

    first, second = tmp_path / "first-bucket", tmp_path / "second-bucket"
    cfg = tiny_config({"train.generations": 1, "run.checkpoint_uri": str(first)})
    for step in (
        lambda: runs.start(cfg),
        lambda: runs.resume(
            cfg.run.run_dir, "test", {"extra": {"train.generations": 2, "run.checkpoint_uri": str(second)}}
        ),
        lambda: runs.resume(cfg.run.run_dir, "test", {"extra": {"train.generations": 3}}),  # no URI given
    ):
        trainer = step()
        try:
            trainer.train()
            assert trainer.finish_uploads(30) == ""
        finally:
            trainer.close()
    assert ckpt.generations(LocalStorage(first), "test") == [0]
    assert ckpt.generations(LocalStorage(second), "test") == [2, 1, 0]  # generation 1 caught up too


def test_a_full_disk_while_writing_the_log_is_one_line_naming_the_last_checkpoint(
    tiny_config, tmp_path, run_cli
) -> None:
    run_dir = tmp_path / "runs"
    (run_dir / "full").mkdir(parents=True)
    (run_dir / "full" / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    done = run_cli(
        *("--preset", "debug", "--run-dir", str(run_dir), "--name", "full", "--generations", "1"),
        *("--set", "run.tensorboard=false", "--set", "run.progress=false"),
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write") and "No space left on device" in lines[-1]
    assert "last complete checkpoint: none yet" in lines[-1] and "Traceback" not in done.stderr


def test_a_torn_last_log_line_is_dropped_with_a_warning_on_resume(tiny_config, capsys) -> None:
    import json
    from pathlib import Path

    cfg = tiny_config({"train.generations": 2})
    trainer = runs.start(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    log = Path(cfg.run.run_dir) / "test" / "metrics.jsonl"
    with log.open("a") as f:
        f.write('{"generation": 2, "fitness_be')  # a write cut short by a full disk or a crash
    capsys.readouterr()
    trainer = runs.resume(cfg.run.run_dir, "test", {"extra": {"train.generations": 3}})
    try:
        trainer.train()
    finally:
        trainer.close()
    assert "metrics.jsonl:3 is not a complete record" in capsys.readouterr().out
    assert [json.loads(line)["generation"] for line in log.read_text().splitlines()] == [0, 1, 2]
