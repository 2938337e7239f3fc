"""The generation loop, and the one place where the whole run's state is saved and restored."""

from __future__ import annotations

import gc
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agents import Batch, PopulationAgent, make_population
from agents.base import device_dtype
from agents.cnn import conv_output_size
from cloud import checkpoint as ckpt
from cloud.storage import Storage, StorageError
from cloud.upload import Uploader
from config import Config, UserError
from training.backends import make_backend
from training.dreamer_member import DreamerMember, toggle_refused
from training.envs import EnvPool, make_env
from training.evolution import Evolution
from training.frames import make_replay
from training.memory import oom
from training.memory.sentinel import LeakSentinel, LeakWarning, spearman
from training.memory.telemetry import TelemetryHistory, memory_snapshot
from training.replay import PackedStreams, ReplayBuffer
from training.report import MetricsLog, ProgressBar, status_block
from training.rollout import MemberSubset, episode_quota, rollout
from training.signals import check_stop, stop_requested
from training.staging import PinnedStaging

PHASE_EXPLORE, PHASE_EVALUATE = 0, 1


def evolved_hyperparameters(cfg: Config, agent: type[PopulationAgent]) -> tuple[str, ...]:
    """The hyperparameters evolution changes: the algorithm's own, less those that only shape
    exploration (TD3's noise) when no exploration steps are taken (``train.steps_per_generation`` 0)."""
    return agent.evolved_hyperparameters(explores=cfg.train.steps_per_generation > 0)


def _check_pixels(cfg: Config, pool: EnvPool, device: torch.device) -> None:
    """One-line refusals of what image observations do not support yet, and of ``agent.amp`` where
    it would do nothing (it autocasts the CNN encoders on CUDA)."""
    pixels = len(pool.obs_shape) > 1
    if pixels and min(conv_output_size(side) for side in pool.obs_shape[1:]) < 1:
        raise UserError(
            f"frames of {'x'.join(map(str, pool.obs_shape[1:]))} are too small for the CNN members "
            "(NatureCNN's kernels 8/4/3, strides 4/2/1 need at least 36x36)"
        )
    if cfg.agent.amp and (device.type != "cuda" or not pixels):
        where = f"runs on {device.type}" if device.type != "cuda" else "has flat observations"
        raise UserError(
            f"agent.amp (bf16 autocast of the CNN encoders) needs CUDA and image observations; this run {where}"
        )


class TrainingDiverged(UserError):
    """Every member's losses became non-finite."""


class UnreadableState(ValueError):
    """A checkpoint's ``state.json`` parsed (and matched its manifest) but has not the structure
    this version writes: a bug or a hand-edited run, refused in one line by a resume."""


class LeakStop(UserError):
    """The leak sentinel confirmed steady growth and ``memory.stop_on_leak`` is set."""


@dataclass
class Counters:
    generation: int = 0
    """The next generation to run."""
    env_steps: int = 0
    updates: int = 0
    model_micro_batches: int = 0
    """Micro-batches (of every member) drawn from the model buffer."""
    elapsed_s: float = 0.0
    best_fitness: list[float] = field(default_factory=list)
    """Best fitness per finished generation."""
    workers_restarted: int = 0
    """Rollout workers replaced (Ray backend: died or hung) over the run, resumes included
    (checkpoints from before this counter restore it as 0)."""


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run: str,
        storage: Storage,
        log: MetricsLog,
        device: torch.device,
        uploader: Uploader | None = None,
    ) -> None:
        """``storage`` is local: every generation is committed there before the loop goes on;
        ``uploader`` copies committed generations to ``run.checkpoint_uri`` in the background."""
        self.cfg = cfg
        self.run_name = run
        self.storage = storage
        self.uploader = uploader
        self.log = log
        self.device = device
        seed = cfg.run.seed
        random.seed(seed)
        torch.manual_seed(seed)
        self.population = cfg.population
        self.pool = EnvPool(lambda: make_env(cfg.env), cfg.population * cfg.env.envs_per_member)
        _check_pixels(cfg, self.pool, device)
        kind = self.pool.action_kind
        self.agent = make_population(cfg.population, self.pool.obs_shape, self.pool.act_dim, cfg.agent, device, kind)
        self.replay = make_replay(  # a FrameReplay (each frame stored once) for frame stacks
            cfg.replay.capacity,
            len(self.pool),
            self.pool.obs_shape,
            self.pool.obs_dtype,
            self.pool.act_dim,
            seed=seed + 1,
            shard_mb=cfg.run.replay_shard_mb,
        )
        self.staging = PinnedStaging(device) if device.type == "cuda" else None
        """CUDA: the reusable pinned buffers every replay sample goes to the device through."""
        self.stored_blobs: dict[str, ckpt.BlobRef] = {}
        """Replay shards in the newest local checkpoint, referenced again while unchanged."""
        self.checkpoint_s = 0.0
        """Time the loop was blocked by the newest checkpoint."""
        evolved = evolved_hyperparameters(cfg, type(self.agent))
        self.evolution = Evolution(cfg.evolution, cfg.population, seed=seed + 2, evolved=evolved)
        self.dreamer = (
            DreamerMember(cfg, self.pool.obs_shape, self.pool.act_dim, device, seed + 3)
            if cfg.dreamer.enabled
            else None
        )
        """The extra Dreamer member (``dreamer.enabled``): ranked with the population, never evolved."""
        self.counters = Counters()
        m = cfg.memory
        self.telemetry = TelemetryHistory()
        self.sentinel = LeakSentinel(
            window=m.leak_window,
            min_slope_mb=m.leak_min_slope_mb,
            warmup=m.leak_warmup,
            stop_on_leak=m.stop_on_leak,
            cuda_available_mb=self._cuda_free_mb if device.type == "cuda" else None,
        )
        self.recording_cuda = False
        self.cuda_history_pending = m.cuda_history
        if m.inject_leak:
            self.agent.leaked_losses = []
        self.backend = make_backend(cfg, self.pool)
        """Where the population's explore and full evaluate rollouts run (``backend.kind``)."""

    # ------------------------------------------------------------ the algorithm

    def train(self) -> dict[str, Any]:
        """Run generations until ``train.generations``; returns the last generation's record."""
        record: dict[str, Any] = {}
        for generation in range(self.counters.generation, self.cfg.train.generations):
            record = self.run_generation(generation)
        return record

    def run_generation(self, generation: int) -> dict[str, Any]:
        """One generation of the algorithm; returns its record (also logged and printed)."""
        started = time.perf_counter()
        c = self.counters
        done_before = (c.env_steps, c.updates, c.model_micro_batches)
        self._maybe_record_cuda_history()
        bar = ProgressBar(
            self._planned_work(), f"gen {generation + 1}/{self.cfg.train.generations}", self.cfg.run.progress
        )

        self.explore(generation, bar)  # noisy actions -> replay, no graph
        dreamer = self.dreamer_step(bar)  # world-model updates, then model rollouts for the members; floats only
        stats = self.learn(bar)  # optimizer steps of K micro-batches each (some imagined); floats only
        fitness, screening = self.evaluate(generation, bar)  # noise-free episodes (screened in imagination)
        dreamer |= self.evaluate_dreamer(generation, bar) | screening  # its own envs, the same start states
        fitness[~np.isfinite(fitness) | stats.pop("diverged")] = -np.inf
        elite = int(np.argmax(fitness))
        elite_lineage = self.evolution.lineage(elite)  # before evolution renames replaced slots
        events = self.evolution.evolve(self.agent, fitness, generation)  # elites, selection, mutation
        bar.close()
        gc.collect()  # end-of-generation hygiene, then measure memory
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

        record, warnings = self.report(
            generation, started, done_before, fitness, elite, elite_lineage, stats, events, dreamer
        )
        self.save_checkpoint()
        check_stop(f"after generation {generation + 1}, which is checkpointed")
        if self.recording_cuda:
            self.dump_cuda_history(f"gen-{generation:06d}")
        if self.sentinel.should_stop:
            raise LeakStop(
                f"stopped after generation {generation + 1} (checkpointed): a memory leak was confirmed "
                f"in {', '.join(w.series for w in warnings)}; see the warning above"
            )
        return record

    def report(
        self,
        generation: int,
        started: float,
        done_before: tuple[int, int, int],
        fitness: np.ndarray,
        elite: int,
        elite_lineage: str,
        stats: dict[str, Any],
        events: list[dict[str, Any]],
        dreamer: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], list[LeakWarning]]:
        """Update counters, measure memory, ask the sentinel, then log and print the generation."""
        elapsed = time.perf_counter() - started
        self.counters.generation = generation + 1
        self.counters.elapsed_s += elapsed
        self.counters.best_fitness.append(float(fitness[elite]))
        memory = self.measure_memory(generation, stats) | self._backend_figures()  # Ray: workers, object store
        warnings = self.sentinel.observe(generation, memory, elapsed)
        env_steps = self.counters.env_steps - done_before[0]
        updates = self.counters.updates - done_before[1]
        real = np.isin(np.arange(self.population), (dreamer or {}).get("screened_out", []), invert=True)
        record = self._record(
            generation, fitness, real, elite, elite_lineage, elapsed, env_steps, updates, memory, warnings
        )
        record |= self._dreamer_record(fitness, dreamer or {}, self.counters.model_micro_batches - done_before[2])
        self.log.write(record, {"fitness": fitness.tolist(), **stats, **self._hyperparameters()})
        self.log.write_events(events)
        print(status_block(record), flush=True)
        for warning in warnings:
            print(warning.message(), flush=True)
        return record, warnings

    def _backend_figures(self) -> dict[str, float]:
        """The backend's figures for the record; the workers it replaced this generation are added
        to the run's checkpointed total (``ray_workers_restarted_total``, which a resume continues)."""
        figures = self.backend.figures()
        if "ray_workers_restarted" in figures:
            self.counters.workers_restarted += int(figures["ray_workers_restarted"])
            figures["ray_workers_restarted_total"] = float(self.counters.workers_restarted)
        return figures

    def explore(self, generation: int, bar: ProgressBar) -> None:
        """``steps_per_generation`` rows of noisy actions in every stream -> replay. Until the replay
        holds ``warmup_steps`` transitions the actions are uniform random, step by step, and the
        phase runs at least until the warm-up is done."""
        random_steps = self._warmup_rows()
        steps = max(self.cfg.train.steps_per_generation, random_steps)
        if steps == 0:
            return
        result = self.backend.rollout(  # here, or on Ray actors (backend.kind)
            self.agent,
            self.replay,
            self._seeds(generation, PHASE_EXPLORE),
            explore=True,
            steps=steps,
            random_steps=random_steps,
            on_step=lambda _: self._safe_point(bar, "explore"),
        )
        self.counters.env_steps += result.env_steps

    def learn(self, bar: ProgressBar) -> dict[str, Any]:
        """``updates_per_generation`` optimizer steps; returns per-member means of each metric
        (lists of P floats) and a ``diverged`` mask ``(P,)`` of members with non-finite losses.
        With model rollouts, ``model_micro_batches`` of an update's micro-batches come from the
        model buffer."""
        t = self.cfg.train
        sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(self.population))
        counts: dict[str, int] = defaultdict(int)
        if len(self.replay) >= max(t.warmup_steps, self.cfg.agent.batch_size):
            for _ in range(t.updates_per_generation):
                imagined = self.model_micro_batches(self.counters.updates)
                real = t.accumulation_steps - imagined
                batches = self._sample(real) + self._sample(imagined, model=True)
                self.counters.model_micro_batches += imagined
                for name, values in self.agent.update(batches).items():
                    sums[name] += values
                    counts[name] += 1
                self.counters.updates += 1
                self._safe_point(bar, "learn")
        stats: dict[str, Any] = {name: (sums[name] / counts[name]).tolist() for name in sums}
        diverged = np.zeros(self.population, bool)
        for values in stats.values():
            diverged |= ~np.isfinite(values)
        if diverged.all():
            raise TrainingDiverged(
                "every member's losses became non-finite (NaN/inf); "
                "lower the learning rates or check the environment's rewards"
            )
        stats["diverged"] = diverged
        return stats

    def evaluate(self, generation: int, bar: ProgressBar) -> tuple[np.ndarray, dict[str, Any]]:
        """Fitness ``(P,)``: mean return of exactly ``eval_episodes`` noise-free episodes per member.
        Every member starts from the same states (common random numbers), so the ranking
        compares policies, not how lucky each member's start states were.

        With screening (``dreamer.screen``, once the model has trained) every member's fitness is
        first imagined; except on every ``screen_check_every``-th generation only the elites and the
        most promising others play for real, and the rest rank below them in imagined order.
        Returns (fitness, screening figures for the record)."""
        imagined = self._imagined_fitness()
        members = self._members_to_evaluate(generation, imagined)
        real, env_steps = self._evaluate_members(generation, members, bar)
        fitness = np.full(self.population, -np.inf)
        fitness[members] = real
        if imagined is None:
            return fitness, {}
        figures: dict[str, Any] = {"screen_evaluated": len(members)}
        figures["screen_saved_steps"] = env_steps * (self.population - len(members)) // len(members)
        if len(members) == self.population:
            figures["screen_spearman"] = spearman(imagined, real)
        else:
            unevaluated = [s for s in np.argsort(-imagined, kind="stable") if s not in members]
            finite = real[np.isfinite(real)]
            floor = float(finite.min()) if finite.size else -np.inf
            fitness[unevaluated] = floor - 1.0 - np.arange(len(unevaluated))
        figures["screen_imagined"] = imagined.tolist()
        figures["screened_out"] = [s for s in range(self.population) if s not in members]
        return fitness, figures

    def _imagined_fitness(self) -> np.ndarray | None:
        """Every member's imagined fitness ``(P,)``, or None without screening or before the
        world model has had ``dreamer.imagine_after`` updates."""
        if self.dreamer is None or not self.cfg.dreamer.screen or not self.dreamer.imagination_ready:
            return None
        return self.dreamer.screen(self.flat_replay, self.agent)

    def _members_to_evaluate(self, generation: int, imagined: np.ndarray | None) -> list[int]:
        """Sorted slots that play for real: all of them without screening and on check generations;
        else the last evolution's elites and the best others by ``imagined``, ``m`` in all, ``m`` the
        smallest divisor of ``P`` at or above ``screen_fraction * P`` (so the replay's rows stay full)."""
        d, count = self.cfg.dreamer, self.population
        if imagined is None or generation % d.screen_check_every == 0:
            return list(range(count))
        elites = sorted(self.evolution.elite_slots)
        wanted = max(math.ceil(d.screen_fraction * count - 1e-9), len(elites), 1)
        size = min(m for m in range(wanted, count + 1) if count % m == 0)
        others = [int(s) for s in np.argsort(-imagined, kind="stable") if s not in elites]
        return sorted(elites + others[: size - len(elites)])

    def _evaluate_members(self, generation: int, members: list[int], bar: ProgressBar) -> tuple[np.ndarray, int]:
        """Play ``members``' evaluation episodes from the generation's common start states (their
        transitions to the replay with ``eval_to_replay``; a subset's packed into full rows).
        Returns (their fitness ``(len(members),)``, env steps)."""
        per_member, everyone = self.cfg.env.envs_per_member, len(members) == self.population
        quota = episode_quota(self.cfg.train.eval_episodes, per_member, len(members))
        streams = (np.asarray(members)[:, None] * per_member + np.arange(per_member)).ravel()
        replay = self.replay if self.cfg.train.eval_to_replay else None
        seeds = np.tile(self._evaluation_seeds(generation), len(members))
        on_step = lambda _: self._safe_point(bar, "evaluate")  # noqa: E731
        if everyone:  # here, or on Ray actors (backend.kind)
            result = self.backend.rollout(
                self.agent, replay, seeds, explore=False, episodes_per_stream=quota, on_step=on_step
            )
        else:  # a screened subset plays in this process, its steps packed into full replay rows
            packed = None if replay is None else PackedStreams(self.flat_replay, len(streams))
            result = rollout(
                MemberSubset(self.agent, members, per_member),
                self.pool.subset(streams),
                packed,
                seeds,
                explore=False,
                episodes_per_stream=quota,
                step_multiple=packed.chunks if packed is not None else 1,
                on_step=on_step,
            )
            if packed is not None:
                packed.flush()
        self.counters.env_steps += result.env_steps
        return result.member_fitness(len(members), quota), result.env_steps

    def dreamer_step(self, bar: ProgressBar) -> dict[str, float]:
        """The Dreamer member's model updates for this generation (none without the member): the
        env steps since its last updates times ``dreamer.train_ratio``, over ``batch_size x seq_len``
        replayed steps per update, with the fraction carried over. Floats only."""
        if self.dreamer is None:
            return {}
        d = self.cfg.dreamer
        trainable = len(self.replay) >= self.cfg.train.warmup_steps and self.replay.filled_rows >= d.seq_len
        updates = self.dreamer.updates_due(self.counters.env_steps, trainable)
        if updates == 0:
            return {"dreamer_updates": 0.0}
        out = self.dreamer.train(self.replay, updates, lambda: self._safe_point(bar, "dreamer"))
        out |= self.dreamer.reward_error(self.replay)
        if d.model_rollouts and out["dreamer_finite"] and self.dreamer.imagination_ready:
            out |= self.dreamer.branch_rollouts(self.flat_replay, self.agent)
        return out

    def model_micro_batches(self, update: int) -> int:
        """How many of update ``update``'s micro-batches come from the model buffer: ``model_fraction``
        of ``accumulation_steps``, spread evenly over updates (0 until the buffer holds a batch)."""
        d, k = self.cfg.dreamer, self.cfg.train.accumulation_steps
        buffer = None if self.dreamer is None else self.dreamer.model_buffer
        if buffer is None or len(buffer) < self.cfg.agent.batch_size:
            return 0
        return math.floor((update + 1) * k * d.model_fraction) - math.floor(update * k * d.model_fraction)

    def evaluate_dreamer(self, generation: int, bar: ProgressBar) -> dict[str, float]:
        """The Dreamer member's fitness, from the start states every member of this generation
        played (``evaluate``'s seeds); its episodes are not added to the replay."""
        if self.dreamer is None:
            return {}
        seeds = self._evaluation_seeds(generation)
        started = time.perf_counter()
        fitness, env_steps = self.dreamer.evaluate(seeds, lambda _: self._safe_point(bar, "dreamer"))
        self.counters.env_steps += env_steps
        return {"dreamer_fitness": fitness, "dreamer_eval_s": time.perf_counter() - started}

    def _dreamer_record(self, fitness: np.ndarray, dreamer: dict[str, Any], model_batches: int) -> dict[str, Any]:
        """The Dreamer member's figures for the record: its metrics (``dreamer_*``) and screening's
        (``screen_*``), its fitness (-inf when a model update saw a non-finite loss), its rank among
        P + 1, whether it is the elite, and the model transitions the members learned from."""
        if self.dreamer is None:
            return {}
        out: dict[str, Any] = dict(dreamer)
        if self.dreamer.model_buffer is not None:
            out["dreamer_model_transitions"] = model_batches * self.population * self.cfg.agent.batch_size
        finite = bool(dreamer.get("dreamer_finite", 1.0)) and np.isfinite(dreamer["dreamer_fitness"])
        out["dreamer_finite"] = float(finite)
        if not finite:
            out["dreamer_fitness"] = float("-inf")
        ours = out["dreamer_fitness"]
        out["dreamer_rank"] = 1 + int(np.sum(fitness > ours)) if finite else len(fitness) + 1
        out["dreamer_elite"] = finite and bool(np.all(ours > fitness))
        out["dreamer_train_steps"] = self.dreamer.agent.train_steps
        return out

    # ------------------------------------------------------------ helpers

    @property
    def flat_replay(self) -> ReplayBuffer:
        """The replay as model rollouts and screening take it: a ``ReplayBuffer`` (with frame stacks
        they are refused, see ``DreamerMember``)."""
        assert isinstance(self.replay, ReplayBuffer), "model rollouts and screening need flat observations"
        return self.replay

    def _safe_point(self, bar: ProgressBar, phase: str) -> None:
        """Between two env steps or optimizer steps: advance the bar, honour a stop signal."""
        if stop_requested() is not None:  # the message is built only when it is needed
            done = self.counters.generation
            last = f"generation {done}" if done else "none yet"
            check_stop(f"during generation {done + 1} ({phase}); last complete checkpoint: {last}")
        bar.advance(1, phase)

    def _sample(self, count: int, model: bool = False) -> list[Batch]:
        """``count`` micro-batches per member from the replay (or, with ``model``, the model buffer),
        each ``(P, B, ...)``: one draw of ``count * P`` rows and one host-to-device copy per field,
        the same draws as ``count`` separate ones; the batches are views of those tensors."""
        if count == 0:
            return []
        source = self.dreamer.model_buffer if model and self.dreamer is not None else self.replay
        assert source is not None
        p, b = self.population, self.cfg.agent.batch_size
        arrays = source.sample(count * p, b)
        names = ("obs", "action", "reward", "next_obs", "terminated")
        if self.staging is not None and not model:
            tensors = self.staging.to_device({name: arrays[name] for name in names})
        else:  # fresh owning arrays: on cpu the tensors share their memory, with no copy
            tensors = {n: torch.as_tensor(arrays[n], dtype=device_dtype(arrays[n]), device=self.device) for n in names}
        fields = [tensors[name].view(count, p, *tensors[name].shape[1:]) for name in names]
        return [Batch(*(field[k] for field in fields)) for k in range(count)]

    def _seeds(self, generation: int, phase: int, count: int = 0) -> np.ndarray:
        """``count`` (default: one per stream) environment reset seeds: a pure function of
        (seed, generation, phase), so a resumed run resets its environments exactly as the
        uninterrupted run did."""
        sequence = np.random.SeedSequence([self.cfg.run.seed, generation, phase])
        return sequence.generate_state(count or len(self.pool)) % 2**31

    def _evaluation_seeds(self, generation: int) -> np.ndarray:
        """One reset seed per env of a member ``(envs_per_member,)``, shared by every member
        (the Dreamer member too): the generation's common start states."""
        return self._seeds(generation, PHASE_EVALUATE, count=self.cfg.env.envs_per_member)

    def _warmup_rows(self) -> int:
        """Rollout steps of uniform random actions still needed to fill ``train.warmup_steps``."""
        missing = max(0, self.cfg.train.warmup_steps - len(self.replay))
        return -(-missing // len(self.pool))

    def _planned_work(self) -> int:
        """Progress-bar units: one per rollout step of all streams, one per optimizer step."""
        t = self.cfg.train
        explore = max(t.steps_per_generation, self._warmup_rows())
        eval_rows = -(-t.eval_episodes // self.cfg.env.envs_per_member) * self.pool.max_episode_steps
        return explore + t.updates_per_generation + eval_rows

    def _hyperparameters(self) -> dict[str, list[float]]:
        return {name: hp.tolist() for name, hp in self.agent.hyperparameters.items()}

    def _record(
        self,
        generation: int,
        fitness: np.ndarray,
        real: np.ndarray,
        elite: int,
        lineage: str,
        elapsed: float,
        env_steps: int,
        updates: int,
        memory: dict[str, float],
        warnings: list[LeakWarning],
    ) -> dict[str, Any]:
        """The generation's record; median and worst fitness count only members evaluated for
        real (``real (P,)`` bool: screened-out members hold placeholder ranks)."""
        finite = fitness[real & np.isfinite(fitness)]
        c = self.counters
        return {
            "generation": generation,
            "generations": self.cfg.train.generations,
            "env_id": self.cfg.env.id,
            "population": self.population,
            "env_steps": env_steps,
            "env_steps_total": c.env_steps,
            "env_steps_per_s": env_steps / elapsed,
            "updates": updates,
            "updates_total": c.updates,
            "updates_per_s": updates / elapsed,
            "replay_size": len(self.replay),
            "replay_capacity": self.replay.capacity,
            "generation_s": elapsed,
            "generation_avg_s": c.elapsed_s / c.generation,
            "elapsed_s": c.elapsed_s,
            "fitness_best": float(fitness[elite]),
            "fitness_median": float(np.median(finite)) if finite.size else float("-inf"),
            "fitness_worst": float(finite.min()) if finite.size else float("-inf"),
            "elite_slot": elite,
            "elite_lineage": lineage,
            "mutation_scale": self.evolution.mutation_scale,
            "leak_warnings": [w.series for w in warnings],
            **memory,
            **self._checkpoint_record(),
        }

    def _checkpoint_record(self) -> dict[str, Any]:
        """The previous checkpoint's blocking time and, with a remote location, the upload lag."""
        record: dict[str, Any] = {"checkpoint_s": self.checkpoint_s}
        if self.uploader is not None:
            upload = self.uploader.status()
            record["upload_pending"] = len(upload.pending)
            record["upload_lag_s"] = upload.oldest_pending_s
            record["upload_error"] = upload.fatal or upload.error
        return record

    # ------------------------------------------------------------ memory

    def measure_memory(self, generation: int, stats: dict[str, Any]) -> dict[str, float]:
        """This generation's memory figures (see ``training.memory.telemetry``), kept in the bounded
        history the out-of-memory report reads."""
        metric_items = sum(len(v) for v in stats.values()) + len(self.evolution.pending)
        snapshot = memory_snapshot(
            self.device,
            self.replay,
            {"metric_items": metric_items},
            census=self.cfg.memory.tensor_census,
            collect=False,
        )
        self.telemetry.append(generation, snapshot)
        return snapshot

    def out_of_memory_report(self, error: BaseException) -> str:
        """The report printed before exiting on an out-of-memory error."""
        if self.recording_cuda:
            self.dump_cuda_history("out-of-memory")
        return oom.format_report(error, self.telemetry.records(), self.device)

    def _maybe_record_cuda_history(self) -> None:
        """With ``memory.cuda_history``, record allocator history during this process's first generation."""
        if self.cuda_history_pending:
            self.cuda_history_pending = False
            self.recording_cuda = oom.start_recording(self.device)

    def dump_cuda_history(self, name: str) -> None:
        path = oom.dump_snapshot(self.device, self.log.path.parent / "memory" / f"{name}.pickle")
        oom.stop_recording(self.device)
        self.recording_cuda = False
        if path is not None:
            print(f"CUDA allocator history: {path} (open it at https://pytorch.org/memory_viz)", flush=True)

    def _cuda_free_mb(self) -> float:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free / 2**20

    # ------------------------------------------------------------ state, in one place

    def state(self) -> ckpt.Checkpoint:
        """Everything a resumed run needs to continue exactly where this one stands. Replay
        shards unchanged since the last save are references to their stored copies."""
        tensors = {f"agent.{name}": t for name, t in self.agent.member_tensors().items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        shards, replay_meta = self.replay.state()
        blobs: dict[str, bytes | ckpt.BlobRef] = {}
        if self.cfg.run.save_replay:
            blobs = {name: data if data is not None else self.stored_blobs[name] for name, data in shards.items()}
        py_state = random.getstate()
        meta = {
            "config_hash": self.cfg.hash(),
            "config": self.cfg.to_dict(),
            "counters": dict(vars(self.counters)),  # a copy: the checkpoint never aliases the live counters
            "agent": self.agent.extra_state(),
            "evolution": self.evolution.state(),
            "replay": replay_meta,
            "replay_saved": self.cfg.run.save_replay,
            "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
            "telemetry": self.telemetry.state(),
            "sentinel": self.sentinel.state(),
        }
        if self.dreamer is not None:
            dreamer_tensors, meta["dreamer"] = self.dreamer.state()
            tensors |= dreamer_tensors
        return ckpt.Checkpoint(tensors, meta, blobs)

    def restore(self, state: ckpt.Checkpoint) -> None:
        """Continue from ``state``. ValueError (one line) when its shapes do not fit this trainer;
        :class:`UnreadableState` when its ``state.json`` parses but lacks this version's structure."""
        try:
            self._restore(state)
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise UnreadableState(f"its state has the wrong structure ({type(err).__name__}: {err})") from None

    def _restore(self, state: ckpt.Checkpoint) -> None:
        meta = state.meta
        self._restore_dreamer(state)  # first: refuses a checkpoint with(out) the member before any change
        agent_tensors = {name[len("agent.") :]: t for name, t in state.tensors.items() if name.startswith("agent.")}
        self.agent.load_member_tensors(agent_tensors)
        self.agent.load_extra_state(meta["agent"])
        torch.set_rng_state(state.tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in state.tensors:
            torch.cuda.set_rng_state(state.tensors["rng.cuda"], self.device)
        if meta["replay_saved"]:
            blobs = {name: blob for name, blob in state.blobs.items() if isinstance(blob, bytes)}
            self.replay.load_state(blobs, meta["replay"])
        self.evolution.load_state(meta["evolution"])
        python_rng = meta["rng_python"]
        if not isinstance(python_rng, list) or len(python_rng) != 3:
            raise TypeError("rng_python is not a [version, state, gauss] triple")
        version, internal, gauss = python_rng
        random.setstate((version, tuple(internal), gauss))
        self.counters = Counters(**meta["counters"])
        self.telemetry.load_state(meta["telemetry"])
        self.sentinel.load_state(meta["sentinel"])

    def _restore_dreamer(self, state: ckpt.Checkpoint) -> None:
        """The Dreamer member's state. ValueError (one line; a resume reports it and closes the
        trainer) when the checkpoint was written with the member and this config has none, or the
        reverse, or the member's shapes differ."""
        saved = state.meta.get("dreamer")
        if (saved is None) != (self.dreamer is None):
            raise toggle_refused("the Dreamer member", "dreamer.enabled", saved is not None)
        if self.dreamer is not None and saved is not None:
            self.dreamer.load_state(state.tensors, saved)

    def save_checkpoint(self) -> None:
        """Commit the generation to local storage (the loop waits for this only), apply
        retention there, and queue the generation for upload."""
        started = time.perf_counter()
        generation = self.counters.generation - 1
        try:
            self.stored_blobs = ckpt.save(self.storage, self.run_name, generation, self.state())
        except StorageError as err:
            previous = f"generation {generation}" if generation > 0 else "none yet"
            raise StorageError(
                f"checkpoint of generation {generation + 1} not written ({err}); last complete checkpoint: {previous}"
            ) from None
        self.replay.mark_saved()
        keep, every = self.cfg.run.keep_checkpoints, self.cfg.run.keep_every
        if self.uploader is None:
            ckpt.prune(self.storage, self.run_name, keep, every)
        else:
            with self.uploader.lock:  # not the generation being read for upload
                in_flight = () if self.uploader.in_flight is None else (self.uploader.in_flight,)
                ckpt.prune(self.storage, self.run_name, keep, every, protect=in_flight)
            self.uploader.submit(generation)
            if fatal := self.uploader.status().fatal:
                raise StorageError(f"{fatal}; the run stops (generation {generation + 1} is committed locally)")
        self.checkpoint_s = time.perf_counter() - started

    def finish_uploads(self, timeout_s: float) -> str:
        """Wait up to ``timeout_s`` for pending uploads; '' when all are done, else what is left."""
        if self.uploader is None or self.uploader.wait(0):
            return ""
        pending = len(self.uploader.status().pending)
        print(
            f"waiting up to {timeout_s:g}s for {pending} generation(s) to reach {self.cfg.run.checkpoint_uri} "
            "(Ctrl-C leaves them for the next --resume)",
            flush=True,
        )
        if self.uploader.wait(timeout_s):
            return ""
        upload = self.uploader.status()
        if not upload.pending:  # the last one finished between the wait and this status
            return upload.fatal
        where = self.cfg.run.checkpoint_uri
        reason = upload.fatal or upload.error or f"still uploading after {timeout_s:g}s"
        return (
            f"generation {upload.pending[-1] + 1} is committed in {self.storage.url(self.run_name)} "
            f"but not in {where} ({reason}); `python main.py --resume {self.run_name}` finishes the upload"
        )

    def close(self) -> None:
        self.backend.close()
        if self.uploader is not None:
            self.uploader.close()
        self.pool.close()
        if self.dreamer is not None:
            self.dreamer.close()
        self.log.close()
