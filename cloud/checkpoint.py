"""The checkpoint format: objects first, then a manifest with the size and sha256 of each.

A generation exists only when ``<run>/gen-NNNNNN/MANIFEST.json`` is written and every object
it lists matches it. Tensors are stored with ``torch.save`` and read with
``torch.load(weights_only=True)``, arrays as ``.npy`` read with ``allow_pickle=False``, the
rest as JSON: loading a checkpoint never executes code.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloud.storage import Storage
from config import UserError

FORMAT = "evorl-checkpoint/1"
MANIFEST = "MANIFEST.json"
_GEN = re.compile(r"^gen-(\d{6,})$")


class CheckpointError(UserError):
    """A checkpoint is missing, corrupted or foreign: shown as one line."""


@dataclass
class Checkpoint:
    """What a generation holds: tensors by name, numpy arrays by name, JSON metadata."""

    tensors: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def generation_prefix(run: str, generation: int) -> str:
    return f"{run}/gen-{generation:06d}"


def save(storage: Storage, run: str, generation: int, checkpoint: Checkpoint) -> None:
    """Write every object, then the manifest (the commit), then the ``LATEST`` hint."""
    prefix = generation_prefix(run, generation)
    objects: dict[str, bytes] = {
        "tensors.pt": _tensor_bytes(checkpoint.tensors),
        "state.json": json.dumps(checkpoint.meta, sort_keys=True).encode(),
    }
    for name, array in checkpoint.arrays.items():
        objects[f"arrays/{name}.npy"] = _array_bytes(array)
    entries = {}
    for name, data in objects.items():
        storage.write(f"{prefix}/{name}", data)
        entries[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT, "generation": generation, "objects": entries}
    storage.write(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    storage.write(f"{run}/LATEST", prefix.rsplit("/", 1)[-1].encode())


def load(storage: Storage, run: str, generation: int) -> Checkpoint:
    """Read and verify one generation; raise CheckpointError with the reason if it fails."""
    prefix = generation_prefix(run, generation)
    manifest = _read_manifest(storage, prefix)
    data = {}
    for name, entry in manifest["objects"].items():
        key = f"{prefix}/{name}"
        if not storage.exists(key):
            raise CheckpointError(f"{key} is missing")
        blob = storage.read(key)
        if len(blob) != entry["size"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{key} does not match its manifest (size or sha256)")
        data[name] = blob
    try:
        tensors = torch.load(io.BytesIO(data["tensors.pt"]), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{prefix}/tensors.pt holds objects other than tensors; refused (loading it could execute code)"
        ) from None
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{prefix} cannot be decoded: {str(err).splitlines()[0]}") from None
    try:
        arrays = {
            name[len("arrays/") : -len(".npy")]: np.load(io.BytesIO(blob), allow_pickle=False)
            for name, blob in data.items()
            if name.startswith("arrays/")
        }
        meta = json.loads(data["state.json"])
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{prefix} cannot be decoded: {str(err).splitlines()[0]}") from None
    return Checkpoint(tensors, arrays, meta)


def generations(storage: Storage, run: str) -> list[int]:
    """Generations that have a manifest (not yet verified), newest first."""
    found = set()
    for key in storage.list(run):
        parts = key[len(run) + 1 :].split("/")
        match = _GEN.match(parts[0])
        if match and parts[-1] == MANIFEST and len(parts) == 2:
            found.add(int(match.group(1)))
    return sorted(found, reverse=True)


def load_latest(storage: Storage, run: str) -> tuple[int, Checkpoint, list[str]]:
    """The newest generation that verifies, and one line per newer one rejected."""
    rejected: list[str] = []
    for generation in generations(storage, run):
        try:
            return generation, load(storage, run, generation), rejected
        except CheckpointError as err:
            rejected.append(f"generation {generation} rejected: {err}")
    raise CheckpointError(f"no verified checkpoint in run {run!r}" + (f" ({rejected[0]})" if rejected else ""))


def prune(storage: Storage, run: str, keep: int, every: int = 0) -> None:
    """Keep the newest ``keep`` generations and, with ``every`` > 0, each ``every``-th one
    (generations ``every``, ``2 * every``, ... counted from 1); delete the rest, manifest first."""
    for generation in generations(storage, run)[max(keep, 1) :]:
        if every > 0 and (generation + 1) % every == 0:
            continue
        prefix = generation_prefix(run, generation)
        storage.delete(f"{prefix}/{MANIFEST}")
        for key in storage.list(prefix):
            storage.delete(key)


def _read_manifest(storage: Storage, prefix: str) -> dict[str, Any]:
    key = f"{prefix}/{MANIFEST}"
    if not storage.exists(key):
        raise CheckpointError(f"{key} is missing")
    try:
        manifest = json.loads(storage.read(key))
    except ValueError:
        raise CheckpointError(f"{key} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{key} is not a {FORMAT} manifest")
    return manifest


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, buffer)
    return buffer.getvalue()


def _array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()
