"""Starting and resuming runs: the run folder, its config, storage checks, the device."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from cloud import checkpoint as ckpt
from cloud.storage import LocalStorage, Storage, check_writable, open_storage
from cloud.upload import Uploader
from config import Config, RunConfig, UserError, build_config, changed_keys, from_dict
from training.envs import make_env
from training.report import MetricsLog
from training.trainer import Trainer

RUN_FILE = "run.json"
CHECK_KEY = ".evorl-check"
"""Where the storage check writes its marker (below the checkpoint URI)."""
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
    "run.checkpoint_uri",
    "run.save_replay",
    "run.replay_shard_mb",
    "run.upload_retry_max_s",
    "run.upload_wait_s",
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


@dataclass(frozen=True)
class RunInfo:
    name: str
    created: float
    local: list[int]
    """Generations with a manifest in the run folder, newest first."""
    remote: list[int] | None
    """The same at the checkpoint URI (None without one)."""


def list_runs(run_dir: str, checkpoint_uri: str = "") -> list[RunInfo]:
    """Runs in ``run_dir`` and at ``checkpoint_uri`` with their generations, oldest run first."""
    local = _local_storage(run_dir)
    remote = _remote_storage(checkpoint_uri, local, check=False)
    created: dict[str, float] = {}
    for storage in [s for s in (local, remote) if s is not None]:
        for name in _run_names(storage):
            created.setdefault(name, (_read_run_file(storage, name) or {}).get("created", 0.0))
    return [
        RunInfo(
            name,
            created[name],
            ckpt.generations(local, name),
            ckpt.generations(remote, name) if remote is not None else None,
        )
        for name in sorted(created, key=lambda n: (created[n], n))
    ]


def start(cfg: Config) -> Trainer:
    """Create a new run (refusing to overwrite one, locally or remotely) and a trainer for it."""
    name = cfg.run.name or new_run_name(cfg)
    local = _open_checked(cfg.run.run_dir, name)
    remote = _remote_storage(cfg.run.checkpoint_uri, local)
    for storage in (local, remote):
        if storage is not None and storage.exists(f"{name}/{RUN_FILE}"):
            raise UserError(f"run {name!r} already exists in {storage.url('')}; use --resume or another --name")
    trainer = _build(cfg, name, local, remote)
    record = json.dumps(
        {"version": VERSION, "created": time.time(), "config_hash": cfg.hash(), "config": cfg.to_dict()}, indent=1
    ).encode()
    local.write(f"{name}/{RUN_FILE}", record)
    if remote is not None:
        remote.write_new(f"{name}/{RUN_FILE}", record)
    _write_resolved_config(trainer)
    return trainer


def resume(run_dir: str, name: str, overrides: dict[str, Any], allow: Sequence[str] = ()) -> Trainer:
    """Load the run's newest verified generation (from the run folder or the checkpoint URI),
    rebuild the config it was written with (plus ``overrides``, which may change only safe keys
    and the keys in ``allow``) and return a trainer positioned right after it."""
    local = _local_storage(run_dir)
    explicit_uri = _explicit_checkpoint_uri(overrides)
    name = name or _latest_run(run_dir, explicit_uri or "")
    uri = explicit_uri if explicit_uri is not None else _last_checkpoint_uri(local, name)
    remote = _remote_storage(uri, local)
    storages = [local] if remote is None else [local, remote]
    saved = next((record for s in storages if (record := _read_run_file(s, name)) is not None), None)
    if saved is None:
        raise UserError(f"nothing to resume: no run {name!r} in {' or '.join(s.url('') for s in storages)}")
    if saved.get("version") != VERSION:
        raise UserError(f"run {name!r} was written by an incompatible version ({saved.get('version')})")
    check_writable(local, name)
    generation, state, rejected = ckpt.load_latest(storages, name)
    for line in rejected:
        print(f"warning: {line}")
    for storage in storages:  # so that those generations can be committed again
        for g in ckpt.discard_after(storage, name, generation):
            print(f"warning: removed the manifest of rejected generation {g + 1} in {storage.url(name)}")
    cfg = _resumed_config(name, generation, state, saved, overrides, allow)
    if not local.exists(f"{name}/{RUN_FILE}"):  # e.g. a new machine resuming from a bucket
        local.write(f"{name}/{RUN_FILE}", json.dumps(saved, indent=1).encode())
        if remote is not None:
            _download_logs(remote, local, name)
    trainer = _build(cfg, name, local, remote)
    try:
        trainer.restore(state)
    except ValueError as err:  # shapes that the allowed change altered (population, networks, replay)
        trainer.close()
        raise UserError(f"generation {generation + 1} of run {name!r} does not fit the changed config: {err}") from None
    trainer.log.truncate_after(generation)
    _write_resolved_config(trainer)
    if remote is not None and trainer.uploader is not None:  # catch up on what never reached the remote
        newest_remote = max(ckpt.generations(remote, name), default=-1)
        for g in sorted(ckpt.generations(local, name)):
            if g > newest_remote:
                trainer.uploader.submit(g)
    print(f"resuming run {name!r} after generation {generation + 1} ({trainer.counters.env_steps:,} env steps so far)")
    return trainer


def _resumed_config(
    name: str,
    generation: int,
    state: ckpt.Checkpoint,
    saved: dict[str, Any],
    overrides: dict[str, Any],
    allow: Sequence[str],
) -> Config:
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
    return cfg


def _latest_run(run_dir: str, checkpoint_uri: str) -> str:
    runs = [run for run in list_runs(run_dir, checkpoint_uri) if run.local or run.remote]
    if not runs:
        where = run_dir + (f" or {checkpoint_uri}" if checkpoint_uri else "")
        raise UserError(f"nothing to resume in {where}: no run with a checkpoint")
    return runs[-1].name


def _explicit_checkpoint_uri(overrides: dict[str, Any]) -> str | None:
    """The checkpoint URI given on the command line or in the config file, if any."""
    given = build_config(**overrides).run.checkpoint_uri
    default = RunConfig().checkpoint_uri
    mentioned = "run.checkpoint_uri" in (overrides.get("extra") or {}) or any(
        o.startswith("run.checkpoint_uri=") for o in overrides.get("overrides") or ()
    )
    return given if mentioned or given != default else None


def _last_checkpoint_uri(local: LocalStorage, name: str) -> str:
    """The checkpoint URI the run last went on with, if its folder is here (else none)."""
    import yaml

    resolved = local.root / name / "config.yaml"
    if not resolved.is_file():
        return ""
    try:
        return str(yaml.safe_load(resolved.read_text())["run"]["checkpoint_uri"])
    except (yaml.YAMLError, KeyError, TypeError):
        raise UserError(f"{resolved} is damaged; pass --checkpoint-uri (or --checkpoint-uri '' for none)") from None


def _run_names(storage: Storage) -> list[str]:
    return sorted({key.split("/")[0] for key in storage.list("") if key.count("/") == 1 and key.endswith(RUN_FILE)})


def _read_run_file(storage: Storage, name: str) -> dict[str, Any] | None:
    """The run's record, or None when it has none here."""
    key = f"{name}/{RUN_FILE}"
    if not storage.exists(key):
        return None
    try:
        record = json.loads(storage.read(key))
    except ValueError:
        raise UserError(f"{storage.url(key)} is not valid JSON; not a run of this trainer") from None
    if not isinstance(record, dict):
        raise UserError(f"{storage.url(key)} is not a run of this trainer")
    return record


def _download_logs(remote: Storage, local: LocalStorage, name: str) -> None:
    for key in remote.list(f"{name}/logs"):
        local.write(f"{name}/{key.rsplit('/', 1)[-1]}", remote.read(key))


def _may_change(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or key.startswith("memory.")


def _local_storage(run_dir: str) -> LocalStorage:
    """The run folder's storage: a local path or ``file://`` URI (logs and TensorBoard live there)."""
    if urlparse(run_dir).scheme not in ("", "file"):
        raise UserError(f"--run-dir must be a local folder, got {run_dir!r}; put a bucket in --checkpoint-uri")
    storage = open_storage(run_dir)
    assert isinstance(storage, LocalStorage)
    return storage


def _remote_storage(uri: str, local: LocalStorage, check: bool = True) -> Storage | None:
    """Storage for the checkpoint URI; None without one or when it is the run folder itself.
    ``check``: write, read and delete a marker first, giving up within seconds if that fails."""
    if not uri:
        return None
    storage = open_storage(uri)
    if isinstance(storage, LocalStorage) and storage.root.resolve() == local.root.resolve():
        return None
    if check:
        check_writable(open_storage(uri, quick=True), CHECK_KEY)
    return storage


def _open_checked(run_dir: str, name: str) -> LocalStorage:
    storage = _local_storage(run_dir)
    check_writable(storage, name)
    return storage


def _build(cfg: Config, name: str, local: LocalStorage, remote: Storage | None) -> Trainer:
    device = resolve_device(cfg.run.device)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    make_env(cfg.env).close()  # an unknown or unsupported env fails before anything is written
    run_path = local.root / name
    run_path.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_path, cfg.run.tensorboard)
    uploader = None
    if remote is not None:
        uploader = Uploader(
            local,
            remote,
            name,
            keep=cfg.run.keep_checkpoints,
            keep_every=cfg.run.keep_every,
            log_files=lambda: [log.path, log.lineage_path],
            max_backoff_s=cfg.run.upload_retry_max_s,
        )
    return Trainer(cfg, name, local, log, device, uploader)


def _write_resolved_config(trainer: Trainer) -> None:
    """The config the run goes on with, beside its logs (after the run was set up successfully)."""
    (trainer.log.path.parent / "config.yaml").write_text(_yaml(trainer.cfg))


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
