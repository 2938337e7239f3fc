"""Starting and resuming runs: the run folder, its config, storage checks, the device."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import torch

from cloud import checkpoint as ckpt
from cloud.storage import LocalStorage, check_writable, open_storage
from config import Config, UserError, build_config, changed_keys, from_dict
from training.envs import make_env
from training.report import MetricsLog
from training.trainer import Trainer

RUN_FILE = "run.json"
VERSION = 1
RESUME_MAY_CHANGE = (
    "train.generations",
    "run.device",
    "run.threads",
    "run.progress",
    "run.tensorboard",
    "run.keep_checkpoints",
    "run.keep_every",
    "run.run_dir",
    "run.name",
)
"""Keys a resumed run may change without changing what its checkpoint means (and ``memory.*``)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def new_run_name(cfg: Config) -> str:
    env = re.sub(r"[^A-Za-z0-9]+", "-", cfg.env.id).strip("-").lower()
    return f"{env}-s{cfg.run.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def list_runs(run_dir: str) -> list[tuple[str, list[int]]]:
    """Runs under ``run_dir`` with their checkpointed generations (newest first), oldest run first."""
    storage = _local_storage(run_dir)
    root = storage.root
    if not root.is_dir():
        return []
    runs = sorted((p for p in root.iterdir() if (p / RUN_FILE).is_file()), key=lambda p: (p / RUN_FILE).stat().st_mtime)
    return [(p.name, ckpt.generations(storage, p.name)) for p in runs]


def start(cfg: Config) -> Trainer:
    """Create a new run folder (refusing to overwrite one) and a trainer for it."""
    name = cfg.run.name or new_run_name(cfg)
    storage = _open_checked(cfg.run.run_dir, name)
    if storage.exists(f"{name}/{RUN_FILE}"):
        raise UserError(f"run {name!r} already exists in {cfg.run.run_dir}; use --resume or another --name")
    trainer = _build(cfg, name, storage)
    record = {"version": VERSION, "config_hash": cfg.hash(), "config": cfg.to_dict()}
    storage.write(f"{name}/{RUN_FILE}", json.dumps(record, indent=1).encode())
    _write_resolved_config(trainer)
    return trainer


def resume(run_dir: str, name: str, overrides: dict[str, Any], allow: Sequence[str] = ()) -> Trainer:
    """Load the run's newest verified generation, rebuild the config it was written with (plus
    ``overrides``, which may change only safe keys and the keys in ``allow``) and return a
    trainer positioned right after it."""
    if not name:
        runs = [run for run, generations in list_runs(run_dir) if generations]
        if not runs:
            raise UserError(f"nothing to resume in {run_dir}: no run with a checkpoint")
        name = runs[-1]
    storage = _open_checked(run_dir, name)
    if not storage.exists(f"{name}/{RUN_FILE}"):
        raise UserError(f"nothing to resume: no run {name!r} in {run_dir}")
    saved = json.loads(storage.read(f"{name}/{RUN_FILE}"))
    if saved.get("version") != VERSION:
        raise UserError(f"run {name!r} was written by an incompatible version ({saved.get('version')})")
    generation, state, rejected = ckpt.load_latest(storage, name)
    for line in rejected:
        print(f"warning: {line}")
    written_with = state.meta.get("config", saved["config"])
    if state.meta.get("config_hash") != from_dict(written_with).hash():
        raise UserError(f"checkpoint generation {generation + 1} of run {name!r} belongs to another config")
    cfg = build_config(base=written_with, **overrides)
    changed = [k for k in changed_keys(written_with, cfg.to_dict()) if not _may_change(k) and k not in allow]
    if changed:
        raise UserError(
            f"cannot resume run {name!r} with a changed config: {', '.join(changed)} (a resume may change "
            f"{', '.join(RESUME_MAY_CHANGE)} and memory.*; allow others with --allow-change KEY)"
        )
    trainer = _build(cfg, name, storage)
    try:
        trainer.restore(state)
    except ValueError as err:  # shapes that the allowed change altered (population, networks, replay)
        trainer.close()
        raise UserError(f"generation {generation + 1} of run {name!r} does not fit the changed config: {err}") from None
    trainer.log.truncate_after(generation)
    _write_resolved_config(trainer)
    print(f"resuming run {name!r} after generation {generation + 1} ({trainer.counters.env_steps:,} env steps so far)")
    return trainer


def _may_change(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or key.startswith("memory.")


def _local_storage(run_dir: str) -> LocalStorage:
    """The run folder's storage: a local path or ``file://`` URI (logs and TensorBoard live there)."""
    if urlparse(run_dir).scheme not in ("", "file"):
        raise UserError(
            f"--run-dir must be a local folder, got {run_dir!r}: checkpoints on s3:// and gs:// are not "
            "wired into the trainer yet"
        )
    storage = open_storage(run_dir)
    assert isinstance(storage, LocalStorage)
    return storage


def _open_checked(run_dir: str, name: str) -> LocalStorage:
    storage = _local_storage(run_dir)
    check_writable(storage, name)
    return storage


def _build(cfg: Config, name: str, storage: LocalStorage) -> Trainer:
    device = resolve_device(cfg.run.device)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    make_env(cfg.env).close()  # an unknown or unsupported env fails before anything is written
    run_path = storage.root / name
    run_path.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_path, cfg.run.tensorboard)
    return Trainer(cfg, name, storage, log, device)


def _write_resolved_config(trainer: Trainer) -> None:
    """The config the run goes on with, beside its logs (after the run was set up successfully)."""
    (trainer.log.path.parent / "config.yaml").write_text(_yaml(trainer.cfg))


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
