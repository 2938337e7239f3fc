"""Output folders of the tools: writable, and nothing replaced without ``--force``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from config import UserError


def writable_folder(folder: Path, existing: Sequence[Path], force: bool) -> None:
    """Create ``folder`` if needed and check that files can be written there; refuse (one line)
    when any of ``existing`` (files the command would replace) is there and ``force`` is not set."""
    if existing and not force:
        names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise UserError(f"{folder} already holds {names}; pass --force to replace")
    probe = folder / f".write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {folder}: {err.strerror or err}") from None
