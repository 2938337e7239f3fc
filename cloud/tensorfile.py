"""A checkpoint's tensors as one safetensors file: a length, a JSON header, raw little-endian bytes.

The format (https://github.com/huggingface/safetensors) is simple enough to write here in one
copy of the bytes, half the time the library's ``save`` takes; the tests read every file written
here with the library itself. Reading does not trust the file: the header is parsed
here, bounded by the file's size, and checked completely (names, dtypes from an allow-list,
shapes, offsets that tile the data area exactly) before any tensor is built, each from a copy
of its own bytes. Nothing is unpickled and no code from the file can run; a file that fails a
check raises ``TensorFileError`` with one line saying why, having allocated no more than the
file's size.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

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
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class TensorFileError(ValueError):
    """The bytes are not a valid tensor file; the message is one line."""


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of ``tensors`` (any device, any strides, any dtype in ``DTYPES``),
    values and dtypes bit for bit. The data area starts 8-byte aligned and holds the tensors
    widest dtype first, so every tensor is aligned to its item size (as the library writes it)."""
    _require_little_endian()
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES or name == "__metadata__":
            raise TensorFileError(f"tensor {name!r} of dtype {tensor.dtype} cannot be stored (dtypes: {list(DTYPES)})")
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, offset = {}, 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces
    return b"".join([len(text).to_bytes(8, "little"), text, *(_raw(tensors[name]) for name in order)])


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order (a copy only for a GPU tensor or a non-contiguous one)."""
    if tensor.numel() == 0:  # an empty tensor may have stride 0 (e.g. from numpy), which cannot be viewed as bytes
        return memoryview(b"")
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise TensorFileError("safetensors files are little-endian; this machine is not")


def decode(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors in ``data``, on the CPU, each owning its memory.

    Raises TensorFileError (one line) unless ``data`` is a safetensors file whose header is
    at most ``MAX_HEADER_BYTES`` and lies within the file, is a JSON object without duplicate
    names, lists only dtypes in ``DTYPES``, and whose tensors exactly tile the data area
    (contiguous, non-overlapping, each ``numel * itemsize`` bytes); bool bytes must be 0 or 1."""
    _require_little_endian()
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
