"""The checkpoint format: objects first, then a manifest with the size and sha256 of each.

```
<run>/gen-000123/tensors.safetensors   every tensor (safetensors: a JSON header, raw bytes)
<run>/gen-000123/state.json       everything else that is not bulk data (JSON)
<run>/objects/<sha256>            shared blobs (replay shards), content-addressed, referenced by
                                  every generation in which they did not change
<run>/gen-000123/MANIFEST.json    written last, create-only: the commit
<run>/LATEST                      a hint for people; never trusted over a verified manifest
```

A generation exists only when its manifest is written and every object it lists matches it.
That is the layout of a local run folder. A remote copy (S3, GCS, another folder via the
uploader) stores a generation's own objects content-addressed too, in ``objects/``, and its
manifest names their keys: no write can change an object that a committed generation lists, so
a second writer of the same generation never corrupts the first (its manifest commit is refused).
Wherever a manifest says an object is, ``objects/<sha256>`` is also looked at, so a copy of either
kind fills in damaged objects of the other.
Nothing in the format is unpickled: loading a checkpoint parses JSON (manifests, ``state.json``),
one safetensors header (checked here before any tensor is built, see ``cloud.tensorfile``) and
raw bytes (replay shards, laid out by ``state.json``); no code from a checkpoint can run.
Generations of the previous format (``evorl-checkpoint/2``, tensors in a ``torch.save`` pickle)
are not read: ``python -m cloud.convert`` converts them once, deliberately.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloud import tensorfile
from cloud.storage import LocalStorage, Storage
from config import UserError

FORMAT = "evorl-checkpoint/3"
PREVIOUS_FORMAT = "evorl-checkpoint/2"
"""Tensors in a ``torch.save`` file (``tensors.pt``): refused on load, converted by ``cloud.convert``."""
TENSORS = "tensors.safetensors"
MANIFEST = "MANIFEST.json"
OBJECTS = "objects"
_GEN = re.compile(r"^gen-(\d{6,})$")


class CheckpointError(UserError):
    """A checkpoint is missing, corrupted or foreign: shown as one line."""


class PreviousFormat(CheckpointError):
    """A generation written in ``PREVIOUS_FORMAT``: not damaged, but not read (the line says how to convert)."""


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
    """Write new blobs and the generation's objects, then the manifest (the commit), then
    ``LATEST``. Returns every blob's reference, for the next save to reuse unchanged ones.

    In a local folder the generation's own objects go into ``gen-NNNNNN/`` together (a synced
    temporary folder, renamed; a committed folder is never replaced); elsewhere they are
    content-addressed in ``objects/`` like the blobs, so no write can change what a committed
    generation lists."""
    refs = {}
    for name, blob in checkpoint.blobs.items():
        refs[name] = write_object(storage, run, blob) if isinstance(blob, bytes) else blob
    objects = {
        TENSORS: tensorfile.encode(checkpoint.tensors),
        "state.json": json.dumps(checkpoint.meta, sort_keys=True).encode(),
    }
    if isinstance(storage, LocalStorage):
        storage.write_many(generation_prefix(run, generation), objects)
        own = {name: object_entry(data) for name, data in objects.items()}
    else:
        own = {name: write_object(storage, run, data).to_dict() for name, data in objects.items()}
    manifest = {
        "format": FORMAT,
        "generation": generation,
        "objects": own,
        "shared": {name: ref.to_dict() for name, ref in sorted(refs.items())},
    }
    storage.write_new(manifest_key(run, generation), encode_manifest(manifest))
    storage.write(f"{run}/LATEST", f"gen-{generation:06d}".encode())
    return refs


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def content_addressed(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with every object stored under ``objects/<sha256>`` (how a remote copy holds
    a local generation's own objects)."""
    own = {name: {**entry, "key": f"{OBJECTS}/{entry['sha256']}"} for name, entry in manifest["objects"].items()}
    return {**manifest, "objects": own}


def same_generation(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two manifests commit the same content (wherever each copy stores its objects)."""

    def content(manifest: dict[str, Any]) -> tuple[Any, ...]:
        own = {name: entry.get("sha256") for name, entry in manifest.get("objects", {}).items()}
        shared = {name: entry.get("sha256") for name, entry in manifest.get("shared", {}).items()}
        return manifest.get("generation"), own, shared

    return content(a) == content(b)


def object_entry(data: bytes) -> dict[str, Any]:
    """A manifest's entry for an object in the generation's folder: its size and sha256."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_object(storage: Storage, run: str, data: bytes) -> BlobRef:
    """Store ``data`` under ``<run>/objects/<sha256>`` (the same key always holds the same bytes)."""
    digest = hashlib.sha256(data).hexdigest()
    ref = BlobRef(f"{OBJECTS}/{digest}", len(data), digest)
    storage.write(f"{run}/{ref.key}", data)
    return ref


def load(storage: Storage, run: str, generation: int, fallbacks: Sequence[Storage] = ()) -> Checkpoint:
    """Read and verify one generation; raise CheckpointError with the reason if it fails.

    An object that is missing or corrupted in ``storage`` is taken from the first of
    ``fallbacks`` (e.g. the bucket behind a local copy) that holds it intact.
    """
    manifest = read_manifest(storage, run, generation)
    prefix = generation_prefix(run, generation)
    data = {
        name: _verified(
            storage, fallbacks, _candidates(run, generation, name, key, entry), entry, f"{storage.url(prefix)}/{name}"
        )
        for name, key, entry in _entries(manifest, run)
    }
    try:
        tensors = tensorfile.decode(data[TENSORS])
    except tensorfile.TensorFileError as err:
        raise CheckpointError(f"{storage.url(prefix)}/{TENSORS} refused: {err}") from None
    try:
        meta = json.loads(data["state.json"])
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise CheckpointError(f"{storage.url(prefix)}/state.json cannot be decoded: {err}") from None
    if not isinstance(meta, dict):
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


@dataclass(frozen=True)
class Rejected:
    """A copy of a generation's manifest that did not verify: where, and why."""

    generation: int
    storage: Storage
    reason: str
    previous_format: bool = False
    """Written in ``PREVIOUS_FORMAT``: not damaged, so never discarded (``cloud.convert`` reads it)."""


@dataclass
class Latest:
    """What ``load_latest`` found: the newest generation that verifies in some storage, and every
    copy of a newer (or the same) generation that failed on the way."""

    generation: int
    checkpoint: Checkpoint
    source: Storage
    failed: list[Rejected]

    def messages(self) -> list[str]:
        """One line per rejected newer generation, and one each for the damaged and the
        previous-format copies of the chosen one."""
        lines = self.rejected()
        for old, what in ((False, "is damaged"), (True, "is of the previous format")):
            if copies := [
                r.reason for r in self.failed if r.generation == self.generation and r.previous_format == old
            ]:
                lines.append(
                    f"a copy of generation {self.generation + 1} {what} ({'; '.join(copies)}); "
                    f"using the one in {self.source.url('')}"
                )
        return lines

    def rejected(self) -> list[str]:
        """One line per newer generation that no storage holds intact."""
        newer = sorted({r.generation for r in self.failed if r.generation != self.generation}, reverse=True)
        return [
            f"generation {g + 1} rejected: {'; '.join(r.reason for r in self.failed if r.generation == g)}"
            for g in newer
        ]

    def discard(self, run: str) -> list[Rejected]:
        """Delete the manifest of every copy that failed (only those: a generation another copy
        holds intact, one never examined, or one in the previous format is left alone), so that
        rejected generations can be committed again. Call only once the resume is otherwise accepted."""
        damaged = [copy for copy in self.failed if not copy.previous_format]
        for copy in damaged:
            copy.storage.delete(manifest_key(run, copy.generation))
        return damaged


def load_latest(storages: Sequence[Storage], run: str) -> tuple[int, Checkpoint, list[str]]:
    """``find_latest`` as (generation, checkpoint, one line per rejected newer generation)."""
    latest = find_latest(storages, run)
    return latest.generation, latest.checkpoint, latest.rejected()


def find_latest(storages: Sequence[Storage], run: str) -> Latest:
    """The newest generation that verifies in any of ``storages``: each copy of its manifest is
    tried (earlier storages first, the others filling in damaged objects), and a generation is
    rejected only when no copy verifies."""
    holders: dict[int, list[Storage]] = {}
    for storage in storages:
        for generation in generations(storage, run):
            holders.setdefault(generation, []).append(storage)
    failed: list[Rejected] = []
    for generation in sorted(holders, reverse=True):
        for holder in holders[generation]:
            try:
                checkpoint = load(holder, run, generation, [s for s in storages if s is not holder])
            except CheckpointError as err:
                failed.append(Rejected(generation, holder, str(err), isinstance(err, PreviousFormat)))
                continue
            return Latest(generation, checkpoint, holder, failed)
    where = " or ".join(s.url(run) for s in storages)
    first = f" (generation {failed[0].generation + 1} rejected: {failed[0].reason})" if failed else ""
    raise CheckpointError(f"no verified checkpoint in {where}{first}")


def prune(
    storage: Storage,
    run: str,
    keep: int,
    every: int = 0,
    protect: Collection[int] = (),
    problems: list[str] | None = None,
) -> list[str]:
    """Keep the newest ``keep`` generations (at least one), each ``every``-th one (generations
    ``every``, ``2 * every``, ... counted from 1) and those in ``protect``; delete the rest, each
    manifest before its objects, then leftover generation folders without a manifest, then
    objects no kept manifest references. Returns the deleted keys; what could not be counted
    (a damaged manifest) is appended to ``problems``, or printed as a warning without it."""
    deleted = []
    committed = generations(storage, run)
    for generation in committed[max(keep, 1) :]:
        if (every > 0 and (generation + 1) % every == 0) or generation in protect:
            continue
        deleted.append(manifest_key(run, generation))
        storage.delete(deleted[-1])
    kept = set(committed) - {int(key.split("/")[-2][4:]) for key in deleted}
    for key in storage.list(run):  # first-layout objects of deleted generations, aborted attempts
        folder = _GEN.match(key[len(run) + 1 :].split("/")[0])
        if folder and int(folder.group(1)) not in kept | set(protect):
            storage.delete(key)
            deleted.append(key)
    found: list[str] = []
    deleted += _collect_garbage(storage, run, found)
    if problems is None:
        for problem in found:
            print(f"warning: {problem}", file=sys.stderr, flush=True)
    else:
        problems.extend(found)
    return deleted


def read_manifest(storage: Storage, run: str, generation: int, previous: bool = False) -> dict[str, Any]:
    """A generation's manifest, checked (format, generation, the objects it may name); raise
    CheckpointError with the reason. ``previous``: accept ``PREVIOUS_FORMAT`` too (to know what
    its objects are, or to convert it), else it raises PreviousFormat saying how to convert."""
    key = manifest_key(run, generation)
    if not storage.exists(key):
        raise CheckpointError(f"{storage.url(key)} is missing")
    try:
        manifest = json.loads(storage.read(key))
    except FileNotFoundError:  # deleted since the check (retention, a discard)
        raise CheckpointError(f"{storage.url(key)} is missing") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{storage.url(key)} is not valid JSON") from None
    if isinstance(manifest, dict) and manifest.get("format") == PREVIOUS_FORMAT and not previous:
        raise PreviousFormat(
            f"{storage.url(key)} is of the previous format {PREVIOUS_FORMAT} (tensors in a pickle, no longer read); "
            f"if you trust its source, convert the run once: python -m cloud.convert {storage.url('')} {run}"
        )
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, PREVIOUS_FORMAT):
        raise CheckpointError(f"{storage.url(key)} is not a {FORMAT} manifest")
    if manifest.get("generation") != generation:
        raise CheckpointError(f"{storage.url(key)} names generation {manifest.get('generation')!r}, not {generation}")
    _entries(manifest, run)  # well-formed, and names only what the format defines
    return manifest


def manifest_objects(manifest: dict[str, Any], run: str) -> list[tuple[str, dict[str, Any]]]:
    """(key relative to the storage root, {size, sha256}) of every object a manifest lists,
    shared blobs first."""
    entries = _entries(manifest, run)
    shared = [(f"{run}/{key}", entry) for name, key, entry in entries if name.startswith("shared/")]
    own = [(f"{run}/{key}", entry) for name, key, entry in entries if not name.startswith("shared/")]
    return shared + own


OWN_OBJECTS = {FORMAT: ("state.json", TENSORS), PREVIOUS_FORMAT: ("state.json", "tensors.pt")}
"""The objects every generation of a format has, by name."""
_SHARED_NAME = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_OBJECT_KEY = re.compile(rf"{OBJECTS}/[0-9a-f]{{64}}")


def _entries(manifest: dict[str, Any], run: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, key relative to the run, {size, sha256}) for every object of a manifest. Only the
    names and keys the format defines are accepted: nothing outside the run can be named."""
    prefix = generation_prefix(run, int(manifest["generation"]))[len(run) + 1 :]
    malformed = CheckpointError(f"the manifest of {run}/{prefix} is malformed")
    own, shared = manifest.get("objects"), manifest.get("shared", {})
    if not isinstance(own, dict) or not isinstance(shared, dict):
        raise malformed
    expected = list(OWN_OBJECTS[manifest["format"]])
    if sorted(own) != expected:
        raise CheckpointError(
            f"the manifest of {run}/{prefix} is malformed: it lists {sorted(own)!r}, not {expected!r}"
        )
    entries = [(name, entry.get("key", f"{prefix}/{name}"), entry) for name, entry in own.items() if _valid(entry)]
    entries += [(f"shared/{name}", entry.get("key"), entry) for name, entry in shared.items() if _valid(entry)]
    if len(entries) != len(own) + len(shared):
        raise malformed
    for name, key, _ in entries:
        is_shared = name.startswith("shared/")
        if is_shared and not _SHARED_NAME.fullmatch(name[len("shared/") :]):
            raise CheckpointError(f"the manifest of {run}/{prefix} names a blob {name[len('shared/') :]!r}; refused")
        first_layout = not is_shared and key == f"{prefix}/{name}"
        if not first_layout and not (isinstance(key, str) and _OBJECT_KEY.fullmatch(key)):
            raise CheckpointError(f"the manifest of {run}/{prefix} references {key!r} outside {OBJECTS}/; refused")
    return entries


def _valid(entry: Any) -> bool:
    """An object entry: a size and a sha256 (and, optionally, the key the object is stored under)."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"]) is not None
    )


def read_own_object(storage: Storage, run: str, generation: int, name: str, entry: dict[str, Any]) -> bytes:
    """The bytes of the generation's own object ``name`` (``entry``: its manifest entry), from
    any place a copy keeps it, verified; CheckpointError if no place holds it intact."""
    key = entry.get("key", f"gen-{generation:06d}/{name}")
    label = storage.url(f"{generation_prefix(run, generation)}/{name}")
    return _verified(storage, (), _candidates(run, generation, name, key, entry), entry, label)


def _candidates(run: str, generation: int, name: str, key: str, entry: dict[str, Any]) -> list[str]:
    """Where a copy may hold an object: its key; and for a generation's own objects also both
    places the two kinds of copy use (the generation's folder locally, ``objects/<sha256>``
    remotely), so either kind fills in for the other."""
    keys = [f"{run}/{key}"]
    if not name.startswith("shared/"):
        keys += [f"{generation_prefix(run, generation)}/{name}", f"{run}/{OBJECTS}/{entry['sha256']}"]
    return list(dict.fromkeys(keys))


def _verified(
    storage: Storage, fallbacks: Sequence[Storage], keys: list[str], entry: dict[str, Any], label: str
) -> bytes:
    """The object's bytes from the first source holding it intact; ``label`` names it in messages."""
    problem = ""
    for source in (storage, *fallbacks):
        for key in keys:
            if not source.exists(key):
                problem = problem or f"{label} is missing"
                continue
            blob = source.read(key)
            if len(blob) == entry["size"] and hashlib.sha256(blob).hexdigest() == entry["sha256"]:
                return blob
            problem = problem or f"{label} does not match its manifest (size or sha256 of {key.split('/', 1)[-1]})"
    raise CheckpointError(problem)


def _collect_garbage(storage: Storage, run: str, problems: list[str]) -> list[str]:
    """Delete objects that no manifest references. A manifest that cannot be read protects
    nothing (it cannot be resumed from): said in ``problems``. A failed request raises."""
    referenced: set[str] = set()
    for generation in generations(storage, run):
        try:
            manifest = read_manifest(storage, run, generation, previous=True)  # to be converted: kept
        except CheckpointError as err:
            problems.append(f"{err}; the objects it lists are not kept for it")
            continue
        referenced.update(key for key, _ in manifest_objects(manifest, run))
    garbage = [key for key in storage.list(f"{run}/{OBJECTS}") if key not in referenced]
    for key in garbage:
        storage.delete(key)
    return garbage
