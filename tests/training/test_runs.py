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
