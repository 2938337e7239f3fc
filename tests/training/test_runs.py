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
