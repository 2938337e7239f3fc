"""Starting and resuming runs: the run folder, its config, storage checks, the device."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from cloud import checkpoint as ckpt
from cloud.lease import Lease
from cloud.storage import AlreadyExists, LocalStorage, Storage, StorageError, check_writable, open_storage
from cloud.upload import Uploader
from config import Config, RunConfig, UserError, build_config, changed_keys, from_dict
from training import backends
from training.envs import make_env
from training.report import MetricsLog, read_records, replace_lines
from training.trainer import Trainer, UnreadableState

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
    "run.writer_lease_s",
    "agent.fast_update",
    "agent.compile",
)
"""Keys a resumed run may change without changing what its checkpoint means (and ``memory.*``,
``backend.*``: a run may resume on the other backend or another cluster)."""


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
    lease = _lease(cfg, name, remote, cfg.run.checkpoint_uri)
    if lease is not None:
        lease.refuse_if_taken()
    record = json.dumps(
        {"version": VERSION, "created": time.time(), "config_hash": cfg.hash(), "config": cfg.to_dict()}, indent=1
    ).encode()
    trainer = _build(cfg, name, local, remote, lease)
    try:
        if remote is not None:  # create-only: of two trainers starting the same run together, one stops here
            remote.write_new(f"{name}/{RUN_FILE}", record)
        local.write(f"{name}/{RUN_FILE}", record)
    except StorageError:
        trainer.close()
        raise
    _write_resolved_config(trainer)
    return trainer


def resume(run_dir: str, name: str, overrides: dict[str, Any], allow: Sequence[str] = ()) -> Trainer:
    """Load the run's newest verified generation (from the run folder or the checkpoint URI),
    rebuild the config it was written with (plus ``overrides``, which may change only safe keys
    and the keys in ``allow``) and return a trainer positioned right after it.

    Nothing is deleted or uploaded until the resume is accepted (the config fits, the state
    restores); then only the copies of manifests that failed verification are removed."""
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
    if remote is not None:  # a second trainer on this run stops here, before it writes anything
        Lease(remote, name, RunConfig().writer_lease_s).refuse_if_taken()  # the holder's own ttl_s counts
    check_writable(local, name)
    latest = ckpt.find_latest(storages, name)
    for line in latest.messages():
        print(f"warning: {line}")
    cfg = _resumed_config(name, latest.generation, latest.checkpoint, saved, overrides, allow)
    lease = _lease(cfg, name, remote, uri)
    trainer = _build(cfg, name, local, remote, lease)
    try:
        trainer.restore(latest.checkpoint)
    except UnreadableState as err:
        trainer.close()
        raise UserError(
            f"generation {latest.generation + 1} of run {name!r} cannot be read: {err}; nothing was changed"
        ) from None
    except ValueError as err:  # shapes that the allowed change altered (population, networks, replay)
        trainer.close()
        raise UserError(
            f"generation {latest.generation + 1} of run {name!r} does not fit the changed config: {err}"
        ) from None
    for copy in latest.discard(name):  # accepted: rejected generations can be committed again
        what = "damaged copy of the manifest of" if copy.generation == latest.generation else "manifest of rejected"
        print(f"warning: removed the {what} generation {copy.generation + 1} in {copy.storage.url(name)}")
    _record_run(local, remote, name, saved)
    if remote is not None:
        _merge_logs(remote, trainer.log)
    trainer.log.truncate_after(latest.generation)
    _write_resolved_config(trainer)
    if remote is not None and trainer.uploader is not None:  # catch up on what never reached the remote
        newest_remote = max(ckpt.generations(remote, name), default=-1)
        for g in sorted(ckpt.generations(local, name)):
            if g > newest_remote:
                trainer.uploader.submit(g)
    print(
        f"resuming run {name!r} after generation {latest.generation + 1} "
        f"({trainer.counters.env_steps:,} env steps so far)"
    )
    return trainer


def _record_run(local: LocalStorage, remote: Storage | None, name: str, saved: dict[str, Any]) -> None:
    """The run's record wherever it is missing: a new machine resuming from a bucket, or a
    checkpoint URI added on resume (so that a resume from there, and ``status``, find the run)."""
    record = json.dumps(saved, indent=1).encode()
    if not local.exists(f"{name}/{RUN_FILE}"):
        local.write(f"{name}/{RUN_FILE}", record)
    if remote is not None and not remote.exists(f"{name}/{RUN_FILE}"):
        with suppress(AlreadyExists):  # written meanwhile: the same run's record
            remote.write_new(f"{name}/{RUN_FILE}", record)


def _merge_logs(remote: Storage, log: MetricsLog) -> None:
    """Merge the remote copy of each log into the local one, by generation: a generation's
    records come from the remote if it has them, else from the local file. A longer history
    is never replaced by a shorter one, on either side (the merged file is uploaded later)."""
    run = log.path.parent.name
    for path in (log.path, log.lineage_path):
        key = f"{run}/logs/{path.name}"
        if not remote.exists(key):
            continue
        remote_copy = path.with_name(f".{path.name}.remote")
        try:
            remote_copy.write_bytes(remote.read(key))
            theirs = read_records(remote_copy)
        finally:
            remote_copy.unlink(missing_ok=True)
        ours = read_records(path) if path.exists() else []
        have = {g for g, _ in theirs}
        merged = sorted(theirs + [(g, line) for g, line in ours if g not in have], key=lambda r: r[0])
        replace_lines(path, [line for _, line in merged])


def _resumed_config(
    name: str,
    generation: int,
    state: ckpt.Checkpoint,
    saved: dict[str, Any],
    overrides: dict[str, Any],
    allow: Sequence[str],
) -> Config:
    written = from_dict(state.meta.get("config", saved["config"]))
    if state.meta.get("config_hash") != written.hash():
        raise UserError(f"checkpoint generation {generation + 1} of run {name!r} belongs to another config")
    # Keys added to the config since the checkpoint was written take their defaults (a run from
    # before the Dreamer member has no ``dreamer`` section), so they do not count as changes.
    written_with = written.to_dict()
    cfg = build_config(base=written_with, **overrides)
    changed = [k for k in changed_keys(written_with, cfg.to_dict()) if not _may_change(k) and k not in allow]
    if changed:
        raise UserError(
            f"cannot resume run {name!r} with a changed config: {', '.join(changed)} (a resume may change "
            f"{', '.join(RESUME_MAY_CHANGE)}, memory.* and backend.*; allow others with --allow-change KEY)"
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
    """Folders at the top of ``storage`` that hold a run record (one level is listed, not every object)."""
    return [name for name in storage.folders("") if storage.exists(f"{name}/{RUN_FILE}")]


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


def _may_change(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or key.startswith(("memory.", "backend."))


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


def _lease(cfg: Config, name: str, remote: Storage | None, uri: str) -> Lease | None:
    """This trainer's claim on the run at the checkpoint URI ``uri`` (none without one). Its
    requests give up within seconds: a renewal that fails is retried at the next tick, and
    closing a run must not wait minutes on an unreachable bucket to release the claim."""
    return None if remote is None else Lease(open_storage(uri, quick=True), name, cfg.run.writer_lease_s)


def _build(cfg: Config, name: str, local: LocalStorage, remote: Storage | None, lease: Lease | None) -> Trainer:
    device = resolve_device(cfg.run.device)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    make_env(cfg.env).close()  # an unknown or unsupported env fails before anything is written
    streams = cfg.population * cfg.env.envs_per_member
    backends.check(cfg.backend, streams, cfg.env.envs_per_member)  # Ray missing, unreachable, too few CPUs
    run_path = local.root / name
    run_path.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_path, cfg.run.tensorboard)
    uploader = None
    if remote is not None:
        assert lease is not None
        lease.acquire()
        uploader = Uploader(
            local,
            remote,
            name,
            keep=cfg.run.keep_checkpoints,
            keep_every=cfg.run.keep_every,
            log_files=lambda: [log.path, log.lineage_path],
            max_backoff_s=cfg.run.upload_retry_max_s,
            lease=lease,
        )
    return Trainer(cfg, name, local, log, device, uploader)


def _write_resolved_config(trainer: Trainer) -> None:
    """The config the run goes on with, beside its logs (after the run was set up successfully)."""
    path = trainer.log.path.parent / "config.yaml"
    try:
        LocalStorage(path.parent).write(path.name, _yaml(trainer.cfg).encode())
    except StorageError:
        trainer.close()
        raise


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
