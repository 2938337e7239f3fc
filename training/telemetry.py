"""Memory readings taken once per generation (process RSS; on CUDA the allocator and driver)."""

from __future__ import annotations

import psutil
import torch

MB = 2**20


def memory_snapshot(device: torch.device) -> dict[str, float]:
    """Memory figures in MB: ``rss_mb`` always; on CUDA also ``cuda_allocated_mb``,
    ``cuda_reserved_mb``, ``cuda_peak_mb`` (since the last reset) and ``cuda_driver_used_mb``
    (device-wide used memory, the figure ``nvidia-smi`` shows)."""
    snapshot = {"rss_mb": psutil.Process().memory_info().rss / MB}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        snapshot |= {
            "cuda_allocated_mb": torch.cuda.memory_allocated(device) / MB,
            "cuda_reserved_mb": torch.cuda.memory_reserved(device) / MB,
            "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / MB,
            "cuda_driver_used_mb": (total - free) / MB,
        }
        torch.cuda.reset_peak_memory_stats(device)
    return snapshot
