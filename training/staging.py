"""Host-to-device copies of replay samples through reusable pinned staging buffers (CUDA).

A copy from pageable host memory to the GPU is synchronous and goes through the driver's own bounce
buffer; a ``non_blocking`` copy needs page-locked (pinned) memory. Pinning every sample anew costs
more than it saves, and a ``non_blocking`` copy of a view of replay storage would let the GPU read
rows the replay may overwrite (or keep storage alive through the view: MEMORY.md's incident). So each
field gets one pinned buffer, allocated once for its shape and dtype and reused for every sample: the
fresh sample array is copied into it, then from it to a new device tensor without blocking. Before a
buffer is written again, the previous copies out of it are waited for (a CUDA event).
"""

from __future__ import annotations

import numpy as np
import torch

from agents.base import device_dtype


class PinnedStaging:
    """One staging buffer per field name, reused while the field's shape and dtype stay the same.

    On CUDA the buffers are pinned and the copies asynchronous; on another device (tests) the same
    code runs with ordinary buffers. :meth:`to_device` always returns new device tensors that share
    memory with neither the input arrays nor the buffers.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self.buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0
        """Buffers ever allocated (stays at the number of fields while their shapes do not change)."""
        self._copied: torch.cuda.Event | None = None

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """``name -> array`` (fresh sample arrays, any shape) -> ``name -> device tensor`` of the same
        shape, dtype from :func:`device_dtype`."""
        if self._copied is not None:
            self._copied.synchronize()  # the last copies out of the buffers are done: they may be rewritten
        out = {}
        for name, array in arrays.items():
            buffer = self._buffer(name, array.shape, device_dtype(array))
            buffer.copy_(torch.from_numpy(array))
            out[name] = buffer.to(self.device, non_blocking=self.pin, copy=True)
        if self.pin:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))
        return out

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
            buffer = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
            self.buffers[name] = buffer
            self.allocations += 1
        return buffer

    @property
    def nbytes(self) -> int:
        """Bytes held in staging buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
