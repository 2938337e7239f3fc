"""Convert a run's checkpoints of the previous format (tensors in a ``torch.save`` pickle) in place.

    python -m cloud.convert LOCATION RUN     # LOCATION: the run folder's parent, s3://... or gs://...

The trainer never reads the previous format (``evorl-checkpoint/2``): its ``tensors.pt`` can only
be decoded by unpickling, and torch's ``weights_only`` unpickler had holes (CVE-2025-32434 below
torch 2.6, CVE-2026-24747 below 2.10). This tool does decode it, once, with
``torch.load(weights_only=True)`` and only on torch >= 2.10: run it only on checkpoints whose
source you trust, while no trainer uses the run. Each generation, newest first, gets a
``tensors.safetensors`` with the same tensors and a manifest of the current format, which
replaces the old one (the last step; ``state.json`` and the replay shards are unchanged).
Convert every place that holds the run (the run folder and the bucket) before resuming.
"""

from __future__ import annotations

import argparse
import io
import re
import sys

import torch

from cloud import checkpoint as ckpt
from cloud import tensorfile
from cloud.storage import LocalStorage, Storage, open_storage, redact
from config import UserError

OLD_TENSORS = "tensors.pt"
SAFE_TORCH = (2, 10)
"""The first torch whose ``weights_only`` unpickler has no known hole."""


def convert(storage: Storage, run: str) -> tuple[list[str], bool]:
    """Convert every previous-format generation of ``run`` in ``storage``, newest first.

    Returns one line per generation and whether all of them are now in the current format.
    Raises UserError (one line) on a torch older than 2.10."""
    if _version(torch.__version__) < SAFE_TORCH:
        raise UserError(
            f"torch {torch.__version__} cannot read old checkpoints safely (CVE-2026-24747); "
            "convert with torch>=2.10 (e.g. in a separate environment)"
        )
    lines, complete = [], True
    for generation in ckpt.generations(storage, run):
        try:
            lines.append(_convert_generation(storage, run, generation))
        except ckpt.CheckpointError as err:
            lines.append(f"generation {generation + 1} not converted: {err}")
            complete = False
    return lines, complete


def _convert_generation(storage: Storage, run: str, generation: int) -> str:
    """Write the generation's tensors as safetensors, then its new manifest; one line on what was done."""
    manifest = ckpt.read_manifest(storage, run, generation, previous=True)
    if manifest["format"] == ckpt.FORMAT:
        return f"generation {generation + 1} is already in {ckpt.FORMAT}"
    prefix = ckpt.generation_prefix(run, generation)
    data = ckpt.read_own_object(storage, run, generation, OLD_TENSORS, manifest["objects"][OLD_TENSORS])
    label = storage.url(f"{prefix}/{OLD_TENSORS}")
    tensors = _unpickled_tensors(data, label)
    try:
        encoded = tensorfile.encode(tensors)
    except tensorfile.TensorFileError as err:  # a dtype the format does not take
        raise ckpt.CheckpointError(f"{label}: {err}") from None
    if isinstance(storage, LocalStorage):  # the local layout: the generation's folder
        storage.write(f"{prefix}/{ckpt.TENSORS}", encoded)
        own = ckpt.object_entry(encoded)
    else:
        own = ckpt.write_object(storage, run, encoded).to_dict()
    objects = {"state.json": manifest["objects"]["state.json"], ckpt.TENSORS: own}
    storage.write(
        ckpt.manifest_key(run, generation),
        ckpt.encode_manifest({**manifest, "format": ckpt.FORMAT, "objects": objects}),
    )
    if storage.exists(f"{prefix}/{OLD_TENSORS}"):  # remote objects/<sha256> go with the next retention
        storage.delete(f"{prefix}/{OLD_TENSORS}")
    return f"generation {generation + 1} converted ({len(tensors)} tensors)"


def _unpickled_tensors(data: bytes, label: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file, through the restricted unpickler only."""
    try:
        tensors = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # an UnpicklingError for anything but tensors, or a damaged file
        raise ckpt.CheckpointError(
            f"{label} refused: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ckpt.CheckpointError(f"{label} does not hold a map of names to tensors")
    return tensors


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def main(argv: list[str] | None = None) -> int:
    """The command line: one line per generation; exit code 0 when every generation is converted, else 2."""
    parser = argparse.ArgumentParser(prog="python -m cloud.convert", description=__doc__.split("\n")[0])
    parser.add_argument("location", help="the folder holding the run's folder, or s3://bucket/prefix, gs://...")
    parser.add_argument("run", help="the run's name")
    args = parser.parse_args(argv)
    try:
        storage = open_storage(args.location)
        if not ckpt.generations(storage, args.run):
            raise UserError(f"no checkpointed generation of run {args.run!r} in {storage.url('')}")
        lines, complete = convert(storage, args.run)
    except UserError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    for line in lines:
        print(redact(line))
    return 0 if complete else 2


if __name__ == "__main__":
    sys.exit(main())
