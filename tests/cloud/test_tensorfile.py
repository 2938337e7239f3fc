"""The safetensors file of a checkpoint: exact round trips, and crafted files refused before any allocation."""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from cloud import tensorfile
from cloud.tensorfile import TensorFileError

# ---------------------------------------------------------------- round trips, bit for bit


def bits(tensor: torch.Tensor) -> bytes:
    """The tensor's values as raw bytes (NaN payloads and -0.0 included)."""
    if tensor.numel() == 0:  # no bytes (and a stride-0 empty tensor cannot be viewed as bytes)
        return b""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_equal(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(original)
    for name, tensor in original.items():
        got = loaded[name]
        assert (got.dtype, got.shape, got.device.type) == (tensor.dtype, tensor.shape, "cpu"), name
        assert bits(got) == bits(tensor), name


def round_trip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loaded = tensorfile.decode(tensorfile.encode(tensors))
    assert_bit_equal(loaded, tensors)
    return loaded


FLOATS = torch.tensor(
    [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4028235e38], dtype=torch.float32
)
FLOATS_WITH_NAN_PAYLOAD = torch.cat(
    [FLOATS, torch.tensor([0x7FC00001, -0x00400001], dtype=torch.int32).view(torch.float32)]
)


@pytest.mark.parametrize(
    "tensor",
    [
        FLOATS_WITH_NAN_PAYLOAD,
        torch.randn(4, 3, 2),
        torch.tensor([-(2**63), -1, 0, 1, 2**63 - 1], dtype=torch.int64),
        torch.tensor([[True, False, True], [False, False, True]]),
        torch.arange(256, dtype=torch.uint8),
        torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8),  # pixel observations, later
    ],
    ids=["float32-special-values", "float32", "int64-extremes", "bool", "uint8-all-values", "uint8-pixels"],
)
def test_every_dtype_the_trainer_uses_round_trips_exactly(tensor: torch.Tensor) -> None:
    round_trip({"t": tensor})


def test_the_rng_state_round_trips_and_restores_the_generator() -> None:
    torch.manual_seed(7)
    state = torch.get_rng_state()
    expected = torch.rand(5)
    loaded = round_trip({"rng.torch": state})["rng.torch"]
    torch.set_rng_state(loaded)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool, torch.uint8])
def test_scalar_tensors_round_trip(dtype: torch.dtype) -> None:
    loaded = round_trip({"scalar": torch.tensor(1, dtype=dtype), "zero": torch.tensor(0, dtype=dtype)})
    assert loaded["scalar"].dim() == 0


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool, torch.uint8])
def test_empty_tensors_round_trip(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    round_trip({"empty": torch.zeros(shape, dtype=dtype), "after": torch.ones(2, dtype=dtype)})


def test_an_empty_tensor_with_stride_zero_round_trips() -> None:
    empty = torch.from_numpy(np.zeros(0, np.float32))  # e.g. a checkpointed empty model buffer
    assert empty.stride() == (0,)
    round_trip({"empty": empty, "after": torch.ones(2)})


def test_non_contiguous_tensors_and_views_of_one_storage_round_trip() -> None:
    base = torch.randn(6, 5)
    tensors = {
        "transposed": base.t(),
        "strided": base[::2, 1::2],
        "row": base[3],  # a view into the middle of a storage
        "expanded": torch.arange(3).expand(4, 3),
        "bool-slice": (base > 0)[:, ::3],
        "base": base,
    }
    assert not tensors["transposed"].is_contiguous() and not tensors["strided"].is_contiguous()
    round_trip(tensors)


def test_loaded_tensors_own_their_memory() -> None:
    data = tensorfile.encode({"a": torch.zeros(4), "b": torch.ones(3, dtype=torch.int64)})
    loaded = tensorfile.decode(data)
    loaded["a"] += 1  # writable, and not a view of the file's bytes
    assert tensorfile.decode(data)["a"].sum() == 0
    assert loaded["a"].untyped_storage().data_ptr() != loaded["b"].untyped_storage().data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_round_trip_to_the_cpu() -> None:
    cuda = torch.device("cuda")
    tensors = {
        "weights": torch.randn(3, 4, device=cuda).t(),
        "rng.cuda": torch.cuda.get_rng_state(cuda),
        "flags": torch.tensor([True, False], device=cuda),
        "scalar": torch.tensor(2.5, device=cuda),
    }
    round_trip(tensors)


EVERY_KIND = {
    "f32": torch.randn(3, 2).t(),
    "f64": torch.randn(2, dtype=torch.float64),
    "f16": torch.randn(3).half(),
    "bf16": torch.randn(5).bfloat16(),
    "i64": torch.arange(4),
    "i32": torch.arange(3, dtype=torch.int32),
    "i16": torch.arange(3, dtype=torch.int16),
    "i8": torch.arange(-3, 3, dtype=torch.int8),
    "u8": torch.arange(7, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(True),
    "empty": torch.zeros(0, 3),
}


def test_the_safetensors_library_reads_the_file_exactly() -> None:
    # safetensors before 0.5 cannot load an empty tensor, even from a file it wrote itself
    kinds = EVERY_KIND if _library_reads_empty_tensors() else {k: t for k, t in EVERY_KIND.items() if t.numel()}
    assert_bit_equal(safetensors.torch.load(tensorfile.encode(kinds)), kinds)


def _library_reads_empty_tensors() -> bool:
    try:
        safetensors.torch.load(safetensors.torch.save({"empty": torch.zeros(0)}))
    except ValueError:
        return False
    return True


def test_a_file_the_safetensors_library_wrote_is_read_exactly() -> None:
    contiguous = {name: t.contiguous() for name, t in EVERY_KIND.items()}
    data = safetensors.torch.save(contiguous, metadata={"format": "pt"})
    assert_bit_equal(tensorfile.decode(data), contiguous)


def test_every_tensor_is_aligned_to_its_item_size() -> None:
    data = tensorfile.encode(EVERY_KIND)
    size = int.from_bytes(data[:8], "little")
    assert (8 + size) % 8 == 0
    for name, entry in json.loads(data[8 : 8 + size]).items():
        assert entry["data_offsets"][0] % EVERY_KIND[name].element_size() == 0, name


@pytest.mark.parametrize(
    "name, tensor", [("z", torch.zeros(2, dtype=torch.complex64)), ("__metadata__", torch.zeros(1))]
)
def test_a_tensor_the_format_cannot_hold_is_not_written(name: str, tensor: torch.Tensor) -> None:
    with pytest.raises(TensorFileError, match=re.escape(f"tensor {name!r} of dtype {tensor.dtype} cannot be stored")):
        tensorfile.encode({name: tensor})


# ---------------------------------------------------------------- crafted files


def craft(header: dict[str, Any] | bytes, data: bytes = b"", claimed: int | None = None) -> bytes:
    """A file with ``header`` (a dict as JSON, or raw bytes), whose length field says ``claimed``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if claimed is None else claimed) + text + data


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def torch_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"agent.w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


CRAFTED = {
    "torch.save-file": (torch_pickle(), "not a safetensors file"),
    "plain-pickle": (pickle.dumps({"agent.w": [1.0, 2.0]}), "not a safetensors file"),
    "too-short": (b"\x01\x00", "too short"),
    "header-of-5-GiB": (craft({"a": entry("F32", [1], 0, 4)}, b"\0" * 4, claimed=5 * 2**30), "claims 5,368,709,120"),
    "header-past-the-end": (craft(b'{"a": 1}', claimed=9), "claims 9 bytes of a 16-byte file"),
    "header-not-json": (craft(b"{not json"), "not valid JSON"),
    "header-not-utf8": (craft(b'{"\xff": 1}'), "not valid JSON"),
    "header-nested-deeply": (craft(b"[" * 100_000), "not valid JSON"),
    "header-a-list": (craft(b"[1, 2]"), "not a JSON object"),
    "unknown-dtype": (craft({"a": entry("PICKLE", [1], 0, 4)}, b"\0" * 4), "dtype 'PICKLE'"),
    "dtype-not-allowed": (craft({"a": entry("F8_E5M2", [4], 0, 4)}, b"\0" * 4), "dtype 'F8_E5M2'"),
    "size-lies": (craft({"a": entry("F32", [2, 2], 0, 8)}, b"\0" * 8), "does not take 8 bytes"),
    "huge-shape": (craft({"a": entry("F32", [2**62, 2**62, 2**62], 0, 16)}, b"\0" * 16), "does not take 16 bytes"),
    "offsets-past-the-end": (craft({"a": entry("U8", [1000], 0, 1000)}, b"\0" * 16), "outside the 16 data bytes"),
    "offsets-reversed": (craft({"a": entry("U8", [0], 8, 0)}, b"\0" * 8), "outside the 8 data bytes"),
    "offsets-negative": (craft({"a": entry("U8", [4], -4, 0)}, b"\0" * 4), "not [begin, end]"),
    "overlapping": (
        craft({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12),
        "'b' at bytes 4..12 overlaps",
    ),
    "the-same-bytes-twice": (
        craft({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, b"\0" * 8),
        "overlaps",
    ),
    "duplicate-names": (
        craft(
            b'{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, '
            b'"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}',
            b"\0" * 8,
        ),
        "'a' appears twice",
    ),
    "gap": (craft({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 8, 12)}, b"\0" * 12), "bytes 4..8 unaccounted"),
    "trailing-bytes": (craft({"a": entry("U8", [4], 0, 4)}, b"\0" * 12), "cover 4 of the 12 data bytes"),
    "shape-of-booleans": (craft({"a": entry("U8", [True], 0, 1)}, b"\0"), "not a list of sizes"),
    "shape-of-floats": (craft({"a": entry("U8", [1.0], 0, 1)}, b"\0"), "not a list of sizes"),
    "extra-entry-key": (craft({"a": {**entry("U8", [1], 0, 1), "code": "os.system"}}, b"\0"), "is described by"),
    "entry-not-a-map": (craft({"a": [1, 2]}), "is described by"),
    "metadata-not-strings": (craft({"__metadata__": {"x": 1}}), "__metadata__"),
    "bool-bytes-not-0-or-1": (craft({"a": entry("BOOL", [2], 0, 2)}, b"\x01\x07"), "bytes other than 0 and 1"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_crafted_file_is_refused_in_one_line(name: str) -> None:
    data, message = CRAFTED[name]
    with pytest.raises(TensorFileError, match=re.escape(message)) as caught:
        tensorfile.decode(data)
    assert "\n" not in str(caught.value)


def test_a_crafted_file_allocates_nothing_near_what_it_claims() -> None:
    """The header's and the entries' claims are checked against the file's size before any copy."""
    files = [CRAFTED[name][0] for name in ("header-of-5-GiB", "huge-shape", "offsets-past-the-end")]
    tracemalloc.start()
    try:
        for data in files:
            with pytest.raises(TensorFileError):
                tensorfile.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**10


def test_a_header_longer_than_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = tensorfile.encode({"a": torch.zeros(3)})
    monkeypatch.setattr(tensorfile, "MAX_HEADER_BYTES", 16)
    with pytest.raises(TensorFileError, match="at most 16 accepted"):
        tensorfile.decode(data)


def test_metadata_of_strings_and_padding_are_accepted() -> None:
    header = json.dumps({"__metadata__": {"format": "pt"}, "a": entry("I64", [2], 0, 16)}).encode() + b"    "
    loaded = tensorfile.decode(craft(header, struct.pack("<2q", -5, 7)))
    assert loaded["a"].tolist() == [-5, 7]
