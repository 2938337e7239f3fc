"""The checkpoint format: objects first, then a manifest with the size and sha256 of each.

```
<run>/gen-000123/tensors.pt       every tensor (torch.save, read with weights_only=True)
<run>/gen-000123/state.json       everything else that is not bulk data (JSON)
<run>/objects/<sha256>            shared blobs (replay shards), content-addressed, referenced by
                                  every generation in which they did not change
<run>/gen-000123/MANIFEST.json    written last, create-only: the commit
<run>/LATEST                      a hint for people; never trusted over a verified manifest
```

A generation exists only when its manifest is written and every object it lists matches it.
Nothing in the format is unpickled: loading a checkpoint never executes code.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloud.storage import Storage
from config import UserError

FORMAT = "evorl-checkpoint/2"
MANIFEST = "MANIFEST.json"
OBJECTS = "objects"
_GEN = re.compile(r"^gen-(\d{6,})$")


class CheckpointError(UserError):
    """A checkpoint is missing, corrupted or foreign: shown as one line."""


@dataclass(frozen=True)
class BlobRef:
    """A shared blob already stored under ``<run>/<key>``."""

    key: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "sha256": self.sha256}


@dataclass
class Checkpoint:
    """What a generation holds: tensors by name, JSON metadata, and named blobs of bytes.

    On save a blob may be a ``BlobRef`` to one stored by an earlier generation (unchanged data is
    not written again); on load every blob is bytes.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    blobs: dict[str, bytes | BlobRef]


def generation_prefix(run: str, generation: int) -> str:
    return f"{run}/gen-{generation:06d}"


def manifest_key(run: str, generation: int) -> str:
    return f"{generation_prefix(run, generation)}/{MANIFEST}"


def save(storage: Storage, run: str, generation: int, checkpoint: Checkpoint) -> dict[str, BlobRef]:
    """Write new blobs, then the generation's objects, then the manifest (the commit), then
    ``LATEST``. Returns every blob's reference, for the next save to reuse unchanged ones."""
    refs = {}
    for name, blob in checkpoint.blobs.items():
        if isinstance(blob, bytes):
            digest = hashlib.sha256(blob).hexdigest()
            refs[name] = BlobRef(f"{OBJECTS}/{digest}", len(blob), digest)
            storage.write(f"{run}/{refs[name].key}", blob)
        else:
            refs[name] = blob
    objects = {
        "tensors.pt": _tensor_bytes(checkpoint.tensors),
        "state.json": json.dumps(checkpoint.meta, sort_keys=True).encode(),
    }
    prefix = generation_prefix(run, generation)
    storage.write_many(prefix, objects)
    manifest = {
        "format": FORMAT,
        "generation": generation,
        "objects": {name: _entry(data) for name, data in objects.items()},
        "shared": {name: ref.to_dict() for name, ref in sorted(refs.items())},
    }
    storage.write_new(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    storage.write(f"{run}/LATEST", prefix.rsplit("/", 1)[-1].encode())
    return refs


def load(storage: Storage, run: str, generation: int, fallbacks: Sequence[Storage] = ()) -> Checkpoint:
    """Read and verify one generation; raise CheckpointError with the reason if it fails.

    An object that is missing or corrupted in ``storage`` is taken from the first of
    ``fallbacks`` (e.g. the bucket behind a local copy) that holds it intact.
    """
    manifest = read_manifest(storage, run, generation)
    data = {name: _verified(storage, fallbacks, f"{run}/{key}", entry) for name, key, entry in _entries(manifest, run)}
    prefix = generation_prefix(run, generation)
    try:
        tensors = torch.load(io.BytesIO(data["tensors.pt"]), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{storage.url(prefix)}/tensors.pt holds objects other than tensors; refused (loading it could run code)"
        ) from None
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{storage.url(prefix)} cannot be decoded: {str(err).splitlines()[0]}") from None
    try:
        meta = json.loads(data["state.json"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{storage.url(prefix)}/state.json cannot be decoded: {err}") from None
    if not isinstance(tensors, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{storage.url(prefix)} does not hold a checkpoint")
    blobs: dict[str, bytes | BlobRef] = {
        name[len("shared/") :]: blob for name, blob in data.items() if name.startswith("shared/")
    }
    return Checkpoint(tensors, meta, blobs)


def generations(storage: Storage, run: str) -> list[int]:
    """Generations that have a manifest (not yet verified), newest first."""
    found = set()
    for key in storage.list(run):
        parts = key[len(run) + 1 :].split("/")
        match = _GEN.match(parts[0])
        if match and parts[-1] == MANIFEST and len(parts) == 2:
            found.add(int(match.group(1)))
    return sorted(found, reverse=True)


def load_latest(storages: Sequence[Storage], run: str) -> tuple[int, Checkpoint, list[str]]:
    """The newest generation that verifies in any of ``storages`` (earlier ones preferred for a
    generation they all hold, the others filling in damaged objects), and one line per newer
    generation rejected."""
    holders: dict[int, list[Storage]] = {}
    for storage in storages:
        for generation in generations(storage, run):
            holders.setdefault(generation, []).append(storage)
    rejected: list[str] = []
    for generation in sorted(holders, reverse=True):
        first, *others = holders[generation]
        try:
            return generation, load(first, run, generation, [s for s in storages if s is not first]), rejected
        except CheckpointError as err:
            rejected.append(f"generation {generation + 1} rejected: {err}")
    where = " or ".join(s.url(run) for s in storages)
    raise CheckpointError(f"no verified checkpoint in {where}" + (f" ({rejected[0]})" if rejected else ""))


def discard_after(storage: Storage, run: str, generation: int) -> list[int]:
    """Delete the manifests of generations newer than ``generation`` (rejected ones, when a resume
    fell back past them), so that their generations can be committed again; returns them."""
    newer = [g for g in generations(storage, run) if g > generation]
    for g in newer:
        storage.delete(manifest_key(run, g))
    return newer


def prune(storage: Storage, run: str, keep: int, every: int = 0, protect: Collection[int] = ()) -> list[str]:
    """Keep the newest ``keep`` generations (at least one), each ``every``-th one (generations
    ``every``, ``2 * every``, ... counted from 1) and those in ``protect``; delete the rest, each
    manifest before its objects, then shared blobs no kept manifest references. Returns the
    deleted keys."""
    deleted = []
    for generation in generations(storage, run)[max(keep, 1) :]:
        if (every > 0 and (generation + 1) % every == 0) or generation in protect:
            continue
        prefix = generation_prefix(run, generation)
        deleted.append(manifest_key(run, generation))
        storage.delete(deleted[-1])
        for key in storage.list(prefix):
            storage.delete(key)
            deleted.append(key)
    return deleted + _collect_garbage(storage, run)


def read_manifest(storage: Storage, run: str, generation: int) -> dict[str, Any]:
    key = manifest_key(run, generation)
    if not storage.exists(key):
        raise CheckpointError(f"{storage.url(key)} is missing")
    try:
        manifest = json.loads(storage.read(key))
    except ValueError:
        raise CheckpointError(f"{storage.url(key)} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{storage.url(key)} is not a {FORMAT} manifest")
    if manifest.get("generation") != generation:
        raise CheckpointError(f"{storage.url(key)} names generation {manifest.get('generation')!r}, not {generation}")
    return manifest


def manifest_objects(manifest: dict[str, Any], run: str) -> list[tuple[str, dict[str, Any]]]:
    """(key relative to the storage root, {size, sha256}) of every object a manifest lists,
    shared blobs first."""
    entries = _entries(manifest, run)
    shared = [(f"{run}/{key}", entry) for name, key, entry in entries if name.startswith("shared/")]
    own = [(f"{run}/{key}", entry) for name, key, entry in entries if not name.startswith("shared/")]
    return shared + own


def _entries(manifest: dict[str, Any], run: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, key relative to the run, {size, sha256}) for every object of a manifest."""
    prefix = generation_prefix(run, int(manifest["generation"]))[len(run) + 1 :]
    try:
        own = [(name, f"{prefix}/{name}", entry) for name, entry in manifest["objects"].items()]
        shared = [(f"shared/{name}", ref["key"], ref) for name, ref in manifest.get("shared", {}).items()]
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"the manifest of {run}/{prefix} is malformed") from None
    for _, _, entry in own + shared:
        if not (
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"the manifest of {run}/{prefix} is malformed")
    for _, key, _ in shared:
        if not (isinstance(key, str) and re.fullmatch(rf"{OBJECTS}/[0-9a-f]{{64}}", key)):
            raise CheckpointError(f"the manifest of {run}/{prefix} references {key!r} outside {OBJECTS}/")
    return own + shared


def _verified(storage: Storage, fallbacks: Sequence[Storage], key: str, entry: dict[str, Any]) -> bytes:
    problem = ""
    for source in (storage, *fallbacks):
        if not source.exists(key):
            problem = problem or f"{storage.url(key)} is missing"
            continue
        blob = source.read(key)
        if len(blob) == entry["size"] and hashlib.sha256(blob).hexdigest() == entry["sha256"]:
            return blob
        problem = problem or f"{storage.url(key)} does not match its manifest (size or sha256)"
    raise CheckpointError(problem)


def _collect_garbage(storage: Storage, run: str) -> list[str]:
    """Delete shared blobs that no manifest references (none if any manifest cannot be read)."""
    referenced: set[str] = set()
    for generation in generations(storage, run):
        try:
            manifest = read_manifest(storage, run, generation)
            referenced.update(f"{run}/{key}" for name, key, _ in _entries(manifest, run) if name.startswith("shared/"))
        except CheckpointError:
            return []
    garbage = [key for key in storage.list(f"{run}/{OBJECTS}") if key not in referenced]
    for key in garbage:
        storage.delete(key)
    return garbage


def _entry(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, buffer)
    return buffer.getvalue()
