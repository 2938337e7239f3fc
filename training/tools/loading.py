"""Open one verified generation of a run, from the run folder or a checkpoint URI, through the
checkpoint load API (``cloud.checkpoint.load`` / ``find_latest``), and pick one of its members."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agents import PopulationAgent, make_population
from cloud import checkpoint as ckpt
from cloud.storage import LocalStorage, Storage, open_storage
from config import Config, UserError, from_dict
from training.envs import EnvPool, make_env

if TYPE_CHECKING:
    from training.dreamer_member import DreamerMember

ELITE, DREAMER = "elite", "dreamer"


@dataclass
class Generation:
    """One verified generation: its checkpoint, the config it was written with and its log record."""

    run: str
    generation: int
    """0-based (people count from 1: ``generation + 1`` is printed)."""
    checkpoint: ckpt.Checkpoint
    cfg: Config
    record: dict[str, Any] | None
    """The generation's line of ``metrics.jsonl`` (None when no copy of the log has it)."""
    source: str
    """Where the checkpoint was read (for messages)."""

    @property
    def label(self) -> str:
        return f"run {self.run!r} generation {self.generation + 1}"


@dataclass(frozen=True)
class Member:
    """A chosen member: ``slot`` of the population, or the Dreamer member (``slot`` None)."""

    name: str
    """``elite``, ``dreamer`` or the slot number as given."""
    slot: int | None
    fitness: float | None
    """Its fitness in that generation's evaluation; None when evolution replaced the slot after it."""

    @property
    def label(self) -> str:
        if self.slot is None:
            return "the Dreamer member"
        return f"member {self.name} (slot {self.slot})" if self.name == ELITE else f"member slot {self.slot}"


def storages(run_dir: str, checkpoint_uri: str = "") -> list[Storage]:
    """The run folder first, then the checkpoint URI's storage (if given and not the same folder)."""
    local = open_storage(run_dir)
    if not isinstance(local, LocalStorage):
        raise UserError(f"--run-dir must be a local folder, got {run_dir!r}; put a bucket in --checkpoint-uri")
    if not checkpoint_uri:
        return [local]
    remote = open_storage(checkpoint_uri)
    if isinstance(remote, LocalStorage) and remote.root.resolve() == local.root.resolve():
        return [local]
    return [local, remote]


def latest_run(places: list[Storage]) -> str:
    """The most recently created run with a checkpoint in any of ``places``."""
    found: dict[str, float] = {}
    for storage in places:
        for name in storage.folders(""):
            if ckpt.generations(storage, name):
                found.setdefault(name, _created(storage, name))
    if not found:
        raise UserError(f"no run with a checkpoint in {' or '.join(s.url('') for s in places)}")
    return max(found, key=lambda n: (found[n], n))


def open_generation(places: list[Storage], run: str, generation: int | None = None) -> Generation:
    """Load ``run``'s newest verified generation, or ``generation`` (0-based), verified.
    UserError in one line for a missing run or generation, a damaged or foreign checkpoint."""
    held = {g: s for s in reversed(places) for g in ckpt.generations(s, run)}  # the first place holding each
    where = " or ".join(s.url("") for s in places)
    if not held:
        known = sorted({name for s in places for name in s.folders("") if ckpt.generations(s, name)})
        listed = f" (runs there: {', '.join(known)})" if known else " (no run with a checkpoint there)"
        raise UserError(f"no run {run!r} with a checkpoint in {where}{listed}")
    if generation is None:
        latest = ckpt.find_latest(places, run)
        for line in latest.rejected():
            print(f"warning: {line}", file=sys.stderr, flush=True)
        generation, checkpoint, source = latest.generation, latest.checkpoint, latest.source
    else:
        if generation not in held:
            have = ", ".join(str(g + 1) for g in sorted(held))
            raise UserError(f"run {run!r} has no generation {generation + 1} (checkpointed: {have})")
        first = held[generation]
        checkpoint = ckpt.load(first, run, generation, [s for s in places if s is not first])
        source = first
    cfg = _written_config(checkpoint, f"{run}/gen-{generation:06d}")
    record = _record(places, run, generation)
    return Generation(run, generation, checkpoint, cfg, record, source.url(run))


def _written_config(checkpoint: ckpt.Checkpoint, where: str) -> Config:
    """The config a checkpoint was written with; UserError when it is not one of this trainer's."""
    meta = checkpoint.meta
    if not isinstance(meta.get("config"), dict) or "config_hash" not in meta or "agent" not in meta:
        raise UserError(f"{where} is not a checkpoint of this trainer (no config in its state)")
    try:
        cfg = from_dict(meta["config"])
    except UserError as err:
        raise UserError(f"{where} holds a config this version cannot read ({err})") from None
    if cfg.hash() != meta["config_hash"]:
        raise UserError(f"{where} belongs to another config (its config hash does not match)")
    return cfg


def _record(places: list[Storage], run: str, generation: int) -> dict[str, Any] | None:
    """The generation's metrics record from the run folder's log, else from a remote copy."""
    for storage, key in [(places[0], f"{run}/metrics.jsonl"), *((s, f"{run}/logs/metrics.jsonl") for s in places[1:])]:
        if not storage.exists(key):
            continue
        for record in parse_jsonl(storage.read(key)):
            if record.get("generation") == generation:
                return record
    return None


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    """The complete JSON objects of a JSONL log, one per line (torn or foreign lines skipped)."""
    out = []
    for line in data.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _created(storage: Storage, run: str) -> float:
    try:
        return float(json.loads(storage.read(f"{run}/run.json")).get("created", 0.0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0.0


def choose_member(gen: Generation, member: str) -> Member:
    """``elite`` (the generation's best population member), ``dreamer`` or a slot ``0..P-1``."""
    population = gen.cfg.population
    if member == DREAMER:
        if not gen.cfg.dreamer.enabled:
            raise UserError(f"{gen.label} has no Dreamer member (it was trained with dreamer.enabled=false)")
        fitness = (gen.record or {}).get("dreamer_fitness")
        return Member(DREAMER, None, None if fitness is None else float(fitness))
    if member == ELITE:
        if gen.record is None or "elite_slot" not in gen.record:
            raise UserError(f"no metrics record of {gen.label} says which member is the elite; pass --member SLOT")
        slot = int(gen.record["elite_slot"])
    else:
        try:
            slot = int(member)
        except ValueError:
            raise UserError(f"--member must be elite, dreamer or a slot 0-{population - 1}, got {member!r}") from None
        if not 0 <= slot < population:
            raise UserError(
                f"member slot {slot} is out of range: {gen.label} has {population} members (0-{population - 1})"
            )
    return Member(member, slot, _fitness(gen, slot))


def _fitness(gen: Generation, slot: int) -> float | None:
    """The slot's fitness in the generation's evaluation, unless evolution replaced it afterwards
    (the checkpoint holds the population after evolution) or it was not played for real."""
    replaced = {int(child) for child, _ in gen.checkpoint.meta.get("evolution", {}).get("pending", [])}
    replaced |= {int(s) for s in (gen.record or {}).get("screened_out", [])}  # ranked in imagination only
    fitness = ((gen.record or {}).get("members") or {}).get("fitness")
    if slot in replaced or not isinstance(fitness, list) or slot >= len(fitness):
        return None
    return float(fitness[slot])


def make_pool(cfg: Config, count: int) -> EnvPool:
    """``count`` environments built as the run built them."""
    return EnvPool(lambda: make_env(cfg.env), count)


def population_agent(gen: Generation, pool: EnvPool) -> PopulationAgent:
    """The generation's population on the cpu, every member tensor restored (no optimizer step
    is taken). UserError when the checkpoint's tensors do not fit the config it names."""
    kind = getattr(pool, "action_kind", "box")
    extra = {} if kind == "box" else {"action_kind": kind}
    cfg = gen.cfg
    with torch.random.fork_rng(devices=[]):  # initial weights are overwritten: leave the caller's generator alone
        agent = make_population(cfg.population, pool.obs_shape, pool.act_dim, cfg.agent, torch.device("cpu"), **extra)
    tensors = {n[len("agent.") :]: t for n, t in gen.checkpoint.tensors.items() if n.startswith("agent.")}
    try:
        agent.load_member_tensors(tensors)
    except ValueError as err:
        raise UserError(f"{gen.label} does not fit its own config: {err}") from None
    agent.eval()
    return agent


def dreamer_member(gen: Generation, pool: EnvPool) -> DreamerMember:
    """The generation's Dreamer member on the cpu for ``pool``'s spaces, every tensor restored (its
    sampling generator too, unless it was a GPU's: then, with a warning, a cpu generator seeded as
    the member's first was); it acts in the caller's environments (its own are closed). UserError
    when the checkpoint's member cannot be restored."""
    from training.dreamer_member import PREFIX, DreamerMember

    cfg = gen.cfg
    dreamer = DreamerMember(cfg, pool.obs_shape, pool.act_dim, torch.device("cpu"), cfg.run.seed + 3)
    dreamer.pool.close()
    tensors, fresh = gen.checkpoint.tensors, dreamer.agent.gen.get_state()
    saved = tensors.get(f"{PREFIX}rng")
    if saved is not None and saved.shape != fresh.shape:  # a CUDA generator's state (16 bytes): no cpu draws
        print(
            f"warning: {gen.label}: the Dreamer member sampled with a GPU's generator, which the cpu cannot "
            f"continue; it samples here from a cpu generator seeded with run.seed + 3 = {cfg.run.seed + 3}",
            file=sys.stderr,
            flush=True,
        )
        tensors = {**tensors, f"{PREFIX}rng": fresh}
    try:
        dreamer.load_state(tensors, gen.checkpoint.meta["dreamer"])
    except (ValueError, KeyError) as err:
        raise UserError(f"{gen.label}: the Dreamer member cannot be restored ({err})") from None
    return dreamer


class MemberActor:
    """One population member acting alone: ``(obs (N, obs_dim), is_first (N,)) -> actions (N, act_dim)``
    float32, noise-free, computed by the population's own batched forward in groups of ``rows``
    observations (the trainer's ``env.envs_per_member``; the other members act on zeros and are
    dropped). Float results of a forward depend on its batch shape, so this shape makes a stream's
    actions those the trainer computed, however many episodes are played side by side."""

    def __init__(self, agent: PopulationAgent, slot: int, rows: int = 1) -> None:
        self.agent, self.slot, self.rows = agent, slot, rows

    def __call__(self, obs: np.ndarray, is_first: np.ndarray) -> np.ndarray:
        return np.concatenate([self._act(obs[i : i + self.rows]) for i in range(0, len(obs), self.rows)])

    def _act(self, obs: np.ndarray) -> np.ndarray:
        full = torch.zeros(self.agent.population, *obs.shape)
        full[self.slot] = torch.as_tensor(obs)
        with torch.inference_mode():
            action = self.agent.act(full, False)[self.slot].numpy().astype(np.float32, copy=False)
        return np.nan_to_num(action, nan=0.0, posinf=1.0, neginf=-1.0)
