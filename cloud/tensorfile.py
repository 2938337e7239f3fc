"""A checkpoint's tensors as one safetensors file: a length, a JSON header, raw little-endian bytes.

Writing uses the ``safetensors`` library. Reading does not trust the file: the header is parsed
here, bounded by the file's size, and checked completely (names, dtypes from an allow-list,
shapes, offsets that tile the data area exactly) before any tensor is built, each from a copy
of its own bytes. Nothing is unpickled and no code from the file can run; a file that fails a
check raises ``TensorFileError`` with one line saying why, having allocated no more than the
file's size.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save as _safetensors_save

MAX_HEADER_BYTES = 16 * 2**20
"""A header longer than this is refused (a member's tensors need a few KiB)."""

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtypes this reader accepts (every one the trainer writes, and a few plain ones)."""

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class TensorFileError(ValueError):
    """The bytes are not a valid tensor file; the message is one line."""


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of ``tensors`` (any device, any strides, any dtype in ``DTYPES``).

    Each tensor is copied to the CPU as a contiguous tensor owning its memory (safetensors
    refuses views and tensors that share memory); values and dtypes are kept bit for bit."""
    unknown = sorted(name for name, t in tensors.items() if t.dtype not in DTYPES.values())
    if unknown:
        raise TensorFileError(f"tensor {unknown[0]!r} has dtype {tensors[unknown[0]].dtype}, not one of {list(DTYPES)}")
    return _safetensors_save(_standalone(tensors))


def _standalone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each the sole and exact owner of its storage (a copy where needed)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage()
        owns = t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not owns or (storage.nbytes() > 0 and storage.data_ptr() in seen):
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def decode(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors in ``data``, on the CPU, each owning its memory.

    Raises TensorFileError (one line) unless ``data`` is a safetensors file whose header is
    at most ``MAX_HEADER_BYTES`` and lies within the file, is a JSON object without duplicate
    names, lists only dtypes in ``DTYPES``, and whose tensors exactly tile the data area
    (contiguous, non-overlapping, each ``numel * itemsize`` bytes); bool bytes must be 0 or 1."""
    header, start = _header(data)
    layout = _layout(header, len(data) - start)
    view = memoryview(data)[start:]
    tensors = {}
    for name, (dtype, shape, begin, end) in layout.items():
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = bytearray(view[begin:end])  # a copy: the tensor owns its (aligned) memory
        if dtype == torch.bool and raw.translate(None, b"\x00\x01"):
            raise TensorFileError(f"bool tensor {name!r} holds bytes other than 0 and 1")
        tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape)
    return tensors


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """The JSON header and where the data area starts, read within the file's bounds."""
    if len(data) < 8:
        raise TensorFileError(f"{len(data)} bytes are too short for a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise TensorFileError(
            f"not a safetensors file: its header claims {size:,} bytes of a {len(data):,}-byte file "
            f"(at most {MAX_HEADER_BYTES:,} accepted)"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + size]), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TensorFileError(f"the safetensors header is not valid JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(header, dict):
        raise TensorFileError("the safetensors header is not a JSON object")
    return header, 8 + size


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the name {duplicate!r} appears twice")
    return dict(pairs)


def _layout(header: dict[str, Any], area: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """(dtype, shape, begin, end) per tensor, checked: the tensors tile ``area`` bytes exactly."""
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorFileError("the safetensors header's __metadata__ is not a map of strings")
    layout = {name: _entry(name, entry, area) for name, entry in header.items()}
    end = 0
    for name, (_, _, begin, stop) in sorted(layout.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != end:
            problem = "overlaps the one before it" if begin < end else f"leaves bytes {end}..{begin} unaccounted for"
            raise TensorFileError(f"tensor {name!r} at bytes {begin}..{stop} {problem}")
        end = stop
    if end != area:
        raise TensorFileError(f"the tensors cover {end:,} of the {area:,} data bytes")
    return layout


def _entry(name: str, entry: Any, area: int) -> tuple[torch.dtype, list[int], int, int]:
    """One header entry, checked on its own: known dtype, a shape, offsets matching its size."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise TensorFileError(f"tensor {name!r} is described by {entry!r}, not {sorted(_ENTRY_KEYS)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise TensorFileError(f"tensor {name!r} has dtype {str(dtype)[:40]!r}, not one of {list(DTYPES)}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise TensorFileError(f"tensor {name!r} has shape {str(shape)[:80]}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
        raise TensorFileError(f"tensor {name!r} has data_offsets {str(offsets)[:80]}, not [begin, end]")
    begin, end = offsets
    if not begin <= end <= area:
        raise TensorFileError(f"tensor {name!r} at bytes {begin}..{end} lies outside the {area:,} data bytes")
    if _nbytes(shape, DTYPES[dtype], end - begin) != end - begin:
        raise TensorFileError(f"tensor {name!r} of shape {str(shape)[:80]} {dtype} does not take {end - begin} bytes")
    return DTYPES[dtype], shape, begin, end


def _nbytes(shape: list[int], dtype: torch.dtype, limit: int) -> int:
    """``numel * itemsize``, or some number above ``limit`` once the product passes it (a crafted
    shape of huge sizes is not multiplied out)."""
    if 0 in shape:
        return 0
    nbytes = torch.empty((), dtype=dtype).element_size()
    for size in shape:
        nbytes *= size
        if nbytes > limit:
            break
    return nbytes


def _natural(value: Any) -> bool:
    """A JSON integer >= 0 (JSON true and false are not sizes)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
