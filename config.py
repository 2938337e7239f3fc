"""One tree of dataclasses for the whole trainer, its presets, and how it is built.

A config is built in this order, each layer overriding the one before:
preset -> YAML file (``--config``) -> ``--set section.key=value`` -> dedicated CLI flags.
It is validated once (:meth:`Config.validate`) and is read-only by convention after that;
the resolved config is written beside the run and its :meth:`Config.hash` names what a
checkpoint means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """A problem the user can act on (bad config, unknown environment, corrupt checkpoint,
    diverged training, ...): the command line shows it as one line and exits with code 2."""


@dataclass
class EnvConfig:
    id: str = "Pendulum-v1"
    """A registered gymnasium id (``Pendulum-v1``) or ``package.module:ClassName``."""
    envs_per_member: int = 1
    """Environments each member steps in parallel while collecting."""
    max_episode_steps: int = 0
    """Time limit per episode, replacing the environment's own (longer or shorter); 0 keeps the
    environment's own limit, or applies ``DEFAULT_EPISODE_LIMIT`` (1,000 steps) to one that has none."""


@dataclass
class AgentConfig:
    algorithm: str = "auto"
    """Actor-critic variant of every member (see ``agents.ALGORITHMS``): ``auto`` picks ``td3`` for
    ``Box`` actions and ``sac_discrete`` (discrete soft actor-critic) for ``Discrete`` actions."""
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    """Hidden layer widths of actor and critics."""
    batch_size: int = 256
    """Transitions per micro-batch, per member."""
    actor_lr: float = 3e-4
    """Initial actor learning rate (per member; evolution may perturb it)."""
    critic_lr: float = 3e-4
    """Initial critic learning rate (per member; evolution may perturb it)."""
    gamma: float = 0.99
    """Initial discount (per member)."""
    tau: float = 0.005
    """Initial Polyak factor of the target networks (per member)."""
    exploration_noise: float = 0.1
    """Initial std of Gaussian action noise while collecting, in units of the action half-range."""
    policy_noise: float = 0.2
    """Target policy smoothing noise std (action half-range units)."""
    noise_clip: float = 0.5
    """Clip of the target policy smoothing noise."""
    policy_delay: int = 2
    """Actor and target updates happen every this many critic updates."""
    max_grad_norm: float = 0.0
    """Per-member gradient norm clip; 0 disables. Never mixes members."""
    target_entropy: float = 0.2
    """``sac_discrete``: initial policy entropy each member's temperature is tuned to hold, as a fraction
    of the largest, ``log(actions)`` (per member; evolution may perturb it). 0.2 on CartPole-v1: with 0.5
    seed 1 stayed near a held-out 200 for 40k env steps, with 0.2 it reached 500 at 6.9k."""
    initial_alpha: float = 0.2
    """``sac_discrete``: initial entropy temperature of every member."""
    alpha_lr: float = 3e-4
    """``sac_discrete``: Adam learning rate of each member's log-temperature."""
    fast_update: bool = True
    """``td3``: the fused population update (the micro-batches as one batch, the twin critics as one
    network of 2P rows, one fused Adam step per optimizer); false runs the eager one (micro-batch by
    micro-batch, parameter by parameter: the benchmark's baseline, for debugging). The two agree up
    to float rounding; how, not what, so it is not part of the config hash and a resume may change it."""
    compile: str = "none"
    """``td3`` with ``fast_update``: ``torch.compile`` mode of the fused update's tensor functions:
    ``none``, ``default``, ``reduce-overhead`` (CUDA graphs on a GPU) or ``max-autotune``. Compiling
    takes tens of seconds on a small CPU (``benchmarks/population_update.py`` measures it); not hashed."""
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Image observations: output channels of each member's three convolutions (NatureCNN's kernels
    8/4/3, strides 4/2/1; Mnih et al. 2015 use 32/64/64)."""
    cnn_features: int = 512
    """Image observations: width of the encoder's output (its linear layer), the heads' input."""
    amp: bool = False
    """Image observations on CUDA: the CNN encoders' forward under bf16 autocast (mixed precision);
    refused on cpu and for flat observations."""


@dataclass
class ReplayConfig:
    capacity: int = 1_000_000
    """Capacity in transitions, shared by all members."""


@dataclass
class TrainConfig:
    generations: int = 30
    """Number of generations to run."""
    steps_per_generation: int = 200
    """Exploration env steps per member environment per generation (noisy actions)."""
    updates_per_generation: int = 32
    """Optimizer steps per member per generation."""
    accumulation_steps: int = 6
    """Micro-batches accumulated into each optimizer step."""
    warmup_steps: int = 1_000
    """Transitions in replay before the first update; until then actions are uniform random."""
    eval_episodes: int = 1
    """Evaluation episodes per member per generation (no exploration noise); fitness is their mean return."""
    eval_to_replay: bool = True
    """Add evaluation transitions to the replay buffer (they are real env steps)."""


@dataclass
class EvolutionConfig:
    elites: int = 2
    """Best members copied unchanged into the next generation."""
    tournament_size: int = 3
    """Members drawn per tournament when selecting a parent."""
    replace_fraction: float = 0.25
    """Fraction of the population (worst first, never elites) replaced each generation."""
    mutation_scale: float = 0.01
    """Std of Gaussian noise added to a child's actor weights, relative to each tensor's std."""
    mutation_fraction: float = 0.1
    """Fraction of actor weights a mutation touches."""
    adaptive_mutation: bool = False
    """1/5th success rule: grow the scale when children beat their parents often, shrink otherwise."""
    crossover_prob: float = 0.0
    """Probability a child's actor is a uniform per-neuron crossover of two parents."""
    perturb_prob: float = 0.8
    """Probability a child's hyperparameters are perturbed (else resampled within bounds)."""
    perturb_factors: list[float] = field(default_factory=lambda: [0.8, 1.25])
    """Factors a perturbation multiplies a hyperparameter by (one chosen at random); the discount
    is perturbed as a horizon, i.e. ``1 - gamma`` is multiplied."""
    actor_lr_bounds: list[float] = field(default_factory=lambda: [1e-5, 3e-3])
    critic_lr_bounds: list[float] = field(default_factory=lambda: [1e-5, 3e-3])
    gamma_bounds: list[float] = field(default_factory=lambda: [0.95, 0.999])
    tau_bounds: list[float] = field(default_factory=lambda: [0.001, 0.05])
    exploration_noise_bounds: list[float] = field(default_factory=lambda: [0.02, 0.5])
    target_entropy_bounds: list[float] = field(default_factory=lambda: [0.05, 0.95])


@dataclass
class MemoryConfig:
    leak_window: int = 20
    """Generations in the leak sentinel's rolling window (after warm-up)."""
    leak_warmup: int = 3
    """First generations the sentinel ignores (allocator and caches settling)."""
    leak_min_slope_mb: float = 1.0
    """Growth below this many MB per generation is never called a leak."""
    stop_on_leak: bool = False
    """Checkpoint and stop the run when a leak is confirmed (otherwise warn and go on)."""
    tensor_census: bool = True
    """Count live tensors (and those carrying autograd graphs) every generation."""
    cuda_history: bool = False
    """On CUDA, record allocator history during the next generation and dump a snapshot file
    (open it at https://pytorch.org/memory_viz)."""
    inject_leak: bool = False
    """Debug only: keep every critic loss with its autograd graph (MEMORY.md incident 1), to
    show that the sentinel catches it."""


@dataclass
class RunConfig:
    seed: int = 0
    """Seeds python, numpy, torch and the environments."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``/``cuda:N``."""
    threads: int = 0
    """Torch intra-op CPU threads; 0 keeps torch's default (one per core). Use 1 when several
    trainers share a machine: spinning OpenMP threads then stall each other for seconds."""
    run_dir: str = "runs"
    """Local folder that holds runs: logs, TensorBoard and every generation's checkpoint."""
    checkpoint_uri: str = ""
    """Where checkpoints are also uploaded, in the background: ``gs://bucket/prefix``,
    ``s3://bucket/prefix`` or another local path (e.g. a network mount); empty keeps them only in
    ``run_dir``. ``--resume`` continues from the newest verified generation in either place."""
    name: str = ""
    """Run name; empty makes one from env, preset and time."""
    keep_checkpoints: int = 3
    """Newest generations kept (the newest is never deleted)."""
    keep_every: int = 0
    """Also keep every this-many-th generation (10: generations 10, 20, ...); 0 keeps no extra."""
    save_replay: bool = True
    """Include the replay buffer in checkpoints (needed for exact resume)."""
    replay_shard_mb: float = 16.0
    """Size of a replay checkpoint shard; only shards written to since the last checkpoint are saved."""
    upload_retry_max_s: float = 60.0
    """Failed uploads are retried after 1 s, 2 s, 4 s, ... up to this interval, for as long as the run lasts."""
    upload_wait_s: float = 600.0
    """At the end of a run, how long to wait for pending uploads (a run stopped by a signal waits at most 20 s)."""
    writer_lease_s: float = 60.0
    """With ``checkpoint_uri``: a trainer's claim on its run there lasts this long unless renewed
    (every quarter of it); a second trainer on the same run stops while the claim is alive."""
    tensorboard: bool = True
    """Write TensorBoard scalars."""
    progress: bool = True
    """Show a progress bar during a generation (only on a terminal)."""


@dataclass
class DreamerConfig:
    enabled: bool = False
    """Add a Dreamer world-model member (DreamerV3 recipe, ``agents/dreamer``) to the population."""
    size: str = "tiny"
    """Network size preset (``agents.dreamer.sizes.SIZES``): ``tiny`` fits 2 CPU cores; ``small``,
    ``medium`` (DreamerV3 size12m), ``large`` (size50m) are for GPUs."""
    batch_size: int = 16
    """Sequences per world-model update."""
    seq_len: int = 64
    """Steps per training sequence."""
    train_ratio: float = 1.0
    """Replayed steps per env step: a generation gets ``env steps * train_ratio / (batch_size * seq_len)``
    model updates (every env step of the run counts, the Dreamer member's own included; a fraction is
    carried to the next generation). 1.0 (DreamerV3 uses 512) keeps the ``pendulum`` preset's ~3,400
    env steps a generation at ~3 updates, ~3 s at the ``tiny`` size on 2 CPU cores; raise it on a GPU."""
    model_lr: float = 0.0
    """Adam learning rate of the world model; 0 takes the size preset's (``tiny`` 6e-4, the GPU
    sizes 1e-4 as DreamerV3)."""
    actor_lr: float = 3e-5
    """Adam learning rate of the imagination actor."""
    critic_lr: float = 3e-5
    """Adam learning rate of the imagination critic."""
    model_grad_clip: float = 1000.0
    """Global gradient-norm clip of the world model (plain clipping, not adaptive); 0 disables."""
    ac_grad_clip: float = 100.0
    """Global gradient-norm clip of the actor and of the critic, each; 0 disables."""
    horizon: int = 15
    """Imagination horizon of the actor-critic update."""
    gamma: float = 0.997
    """Discount in imagination (a horizon of about 333 steps)."""
    lam: float = 0.95
    """Lambda of the imagined lambda-returns."""
    entropy: float = 3e-4
    """Actor entropy bonus (on normalised returns)."""
    return_norm_rate: float = 0.01
    """EMA rate of the 5th/95th return percentiles that normalise advantages."""
    slow_critic_rate: float = 0.02
    """EMA rate of the slow critic (a regularising target of the critic)."""
    kl_dyn: float = 0.5
    """Weight of the dynamics KL term (trains the prior)."""
    kl_rep: float = 0.1
    """Weight of the representation KL term (trains the posterior)."""
    free_bits: float = 1.0
    """Each KL term below this many nats gives no gradient."""
    unimix: float = 0.01
    """Uniform mix of the categorical latents' probabilities."""
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Channels of the world model's three image convolutions (NatureCNN's 32/64/64), for stacked
    frame observations; the decoder mirrors them."""
    cnn_features: int = 512
    """Embedding width of the world model's image encoder (NatureCNN's 512)."""
    imagine_after: int = 100
    """World-model updates before its imagination is used for the population (model rollouts and
    screening): rollouts of an untrained model would teach the members noise."""
    model_rollouts: bool = False
    """MBPO-style data for the other members: after its updates, branched model rollouts from real
    replay states with every member's current actor go to a bounded model buffer (never the replay)."""
    rollout_starts: int = 256
    """Real start states per member per generation for the model rollouts."""
    rollout_length: int = 1
    """Steps ``k`` of each branched model rollout (MBPO: short, so model errors do not compound)."""
    model_buffer: int = 50_000
    """Capacity of the model buffer in transitions (oldest evicted first)."""
    model_fraction: float = 0.5
    """Share of every member's micro-batches drawn from the model buffer (of ``accumulation_steps``
    per update, spread evenly over updates); the rest come from the real replay."""
    screen: bool = False
    """Screen members in imagination and spend real evaluation episodes only on the elites and the
    most promising others; the rest are ranked below them in imagined order."""
    screen_fraction: float = 0.5
    """Share of the population evaluated for real on screened generations (rounded up to a divisor
    of the population, elites included)."""
    screen_horizon: int = 15
    """Imagined steps of the screening estimate (plus the Dreamer critic's bootstrap)."""
    screen_starts: int = 64
    """Real start states (shared by all members) of the screening estimate."""
    screen_check_every: int = 4
    """Every N-th generation all members are evaluated for real and the Spearman correlation of
    imagined vs real fitness is reported (the honest figure of the screening's quality)."""


@dataclass
class BackendConfig:
    """Where the population's rollouts run (README "Scaling out with Ray"); how, never what: a run
    gives the same results on either backend and may resume on the other."""

    kind: str = "local"
    """``local`` (this process) or ``ray``: the population's exploration and full evaluation on Ray
    actors (the ``ray`` extra), the learner, replay, evolution and checkpoints in this process."""
    address: str = ""
    """Ray cluster to join: ``auto`` (the one ``ray start`` set up on this machine) or ``HOST:PORT``;
    empty: start a local Ray instance with this machine's CPUs."""
    workers: int = 0
    """Rollout actors, each holding the environments of a fixed set of members (one CPU each);
    0: as many as ``envs_per_worker`` implies, or one per CPU of the cluster (at most one per member)."""
    envs_per_worker: int = 0
    """Environments per actor (a multiple of ``env.envs_per_member``); 0: the members split evenly."""
    start_timeout_s: float = 120.0
    """How long a (replacement) actor may take to start before the cluster counts as gone."""
    call_timeout_s: float = 600.0
    """How long an actor may take to play its share of one phase before it counts as hung: it is
    killed, replaced and its share played again (three times in a row: the run stops). Raise it
    when one actor's share of a phase legitimately takes longer (a slow simulator, many streams)."""


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    population: int = 16
    """Number of members."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dreamer: DreamerConfig = field(default_factory=DreamerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable hash of what a checkpoint means: everything but the ``run``, ``memory`` and
        ``backend`` sections and ``train.generations``."""
        meaning = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("run", "memory", "backend")}
        defaults = dataclasses.asdict(Config())
        for key in ADDED_KEYS:  # at their defaults, keys added later leave older checkpoints' hashes alone
            section, leaf = key.split(".")
            if meaning[section][leaf] == defaults[section][leaf]:
                del meaning[section][leaf]
        for key in HOW_KEYS:
            section, leaf = key.split(".")
            del meaning[section][leaf]
        if not meaning["dreamer"]["enabled"]:
            del meaning["dreamer"]  # checkpoints from before the Dreamer member keep their hash
        del meaning["train"]["generations"]
        blob = json.dumps(meaning, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> Config:
        """Check ranges and relations; raise UserError naming the key. Returns self."""
        _check(self.population >= 1, "population must be >= 1")
        e, a, t, v = self.env, self.agent, self.train, self.evolution
        _check(e.envs_per_member >= 1, "env.envs_per_member must be >= 1")
        _check(e.max_episode_steps >= 0, "env.max_episode_steps must be >= 0")
        _check(bool(a.hidden_sizes) and min(a.hidden_sizes) >= 1, "agent.hidden_sizes must be positive")
        _check(a.batch_size >= 1, "agent.batch_size must be >= 1")
        for name in ("actor_lr", "critic_lr", "tau", "initial_alpha", "alpha_lr"):
            _check(getattr(a, name) > 0, f"agent.{name} must be > 0")
        _check(0 < a.target_entropy <= 1, "agent.target_entropy must be in (0, 1]")
        _check(0 < a.gamma <= 1, "agent.gamma must be in (0, 1]")
        _check(a.tau <= 1, "agent.tau must be <= 1")
        for name in ("exploration_noise", "policy_noise", "noise_clip", "max_grad_norm"):
            _check(getattr(a, name) >= 0, f"agent.{name} must be >= 0")
        _check(a.policy_delay >= 1, "agent.policy_delay must be >= 1")
        modes = ("none", "default", "reduce-overhead", "max-autotune")
        _check(a.compile in modes, f"agent.compile must be one of {', '.join(modes)}, got {a.compile!r}")
        _check(
            len(a.cnn_channels) == 3 and min(a.cnn_channels) >= 1,
            "agent.cnn_channels must be three positive widths (one per convolution)",
        )
        _check(a.cnn_features >= 1, "agent.cnn_features must be >= 1")
        _check(self.replay.capacity >= a.batch_size, "replay.capacity must be >= agent.batch_size")
        _check(t.generations >= 1, "train.generations must be >= 1")
        for name in ("steps_per_generation", "updates_per_generation", "warmup_steps"):
            _check(getattr(t, name) >= 0, f"train.{name} must be >= 0")
        _check(t.accumulation_steps >= 1, "train.accumulation_steps must be >= 1")
        _check(t.eval_episodes >= 1, "train.eval_episodes must be >= 1")
        _check(v.elites >= 0, "evolution.elites must be >= 0")
        _check(
            v.elites <= self.population,
            f"population ({self.population}) is smaller than evolution.elites ({v.elites}); "
            "lower evolution.elites or raise the population",
        )
        _check(v.tournament_size >= 1, "evolution.tournament_size must be >= 1")
        _check(0 <= v.replace_fraction <= 1, "evolution.replace_fraction must be in [0, 1]")
        _check(v.mutation_scale >= 0, "evolution.mutation_scale must be >= 0")
        for name in ("mutation_fraction", "crossover_prob", "perturb_prob"):
            _check(0 <= getattr(v, name) <= 1, f"evolution.{name} must be in [0, 1]")
        _check(
            len(v.perturb_factors) >= 1 and min(v.perturb_factors) > 0,
            "evolution.perturb_factors must be positive",
        )
        for hp in EVOLVABLE:
            bounds = getattr(v, f"{hp}_bounds")
            _check(
                len(bounds) == 2 and 0 < bounds[0] <= bounds[1],
                f"evolution.{hp}_bounds must be [low, high] with 0 < low <= high",
            )
            _check(
                bounds[0] <= getattr(a, hp) <= bounds[1],
                f"agent.{hp}={getattr(a, hp)} is outside evolution.{hp}_bounds={bounds}",
            )
        _check(v.gamma_bounds[1] < 1, "evolution.gamma_bounds must lie below 1 (evolution searches 1 - gamma)")
        _check(
            self.run.device == "auto" or self.run.device.split(":")[0] in ("cpu", "cuda"),
            f"run.device must be auto, cpu or cuda[:N], got {self.run.device!r}",
        )
        m = self.memory
        _check(m.leak_window >= 4, "memory.leak_window must be >= 4")
        _check(m.leak_warmup >= 0, "memory.leak_warmup must be >= 0")
        _check(m.leak_min_slope_mb >= 0, "memory.leak_min_slope_mb must be >= 0")
        _check(self.run.threads >= 0, "run.threads must be >= 0")
        _check(self.run.keep_every >= 0, "run.keep_every must be >= 0")
        _check(self.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        _check(self.run.replay_shard_mb > 0, "run.replay_shard_mb must be > 0")
        _check(self.run.upload_retry_max_s > 0, "run.upload_retry_max_s must be > 0")
        _check(self.run.upload_wait_s >= 0, "run.upload_wait_s must be >= 0")
        _check(self.run.writer_lease_s > 0, "run.writer_lease_s must be > 0")
        scheme = self.run.checkpoint_uri.split("://", 1)[0] if "://" in self.run.checkpoint_uri else ""
        _check(
            scheme in ("", "file", "s3", "gs"),
            f"run.checkpoint_uri must be a local path, s3://bucket/prefix or gs://bucket/prefix, "
            f"got {self.run.checkpoint_uri!r}",
        )
        _validate_dreamer(self.dreamer)
        _validate_backend(self.backend, self.population, e.envs_per_member)
        return self


EVOLVABLE = tuple(f.name[: -len("_bounds")] for f in dataclasses.fields(EvolutionConfig) if f.name.endswith("_bounds"))
"""Every ``agent.<name>`` that has ``evolution.<name>_bounds``: an algorithm's per-member
hyperparameters (``PopulationAgent.HYPERPARAMETERS``) are drawn from these."""

ADDED_KEYS = (
    "agent.target_entropy",
    "agent.initial_alpha",
    "agent.alpha_lr",
    "evolution.target_entropy_bounds",
    "agent.cnn_channels",
    "agent.cnn_features",
    "agent.amp",
    "dreamer.cnn_channels",
    "dreamer.cnn_features",
)
"""Keys added after checkpoints were first written (with discrete actions and CNN members): :meth:`Config.hash`
leaves them out while they hold their defaults, so those checkpoints still resume."""

HOW_KEYS = ("agent.fast_update", "agent.compile")
"""Keys that choose how the same computation runs, not what it computes: never in :meth:`Config.hash`."""


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _validate_dreamer(d: DreamerConfig) -> None:
    from agents.dreamer.sizes import SIZES  # a leaf module: no torch, no cycle

    _check(d.size in SIZES, f"dreamer.size must be one of {', '.join(SIZES)}, got {d.size!r}")
    for name in (
        "batch_size",
        "seq_len",
        "horizon",
        "rollout_starts",
        "rollout_length",
        "model_buffer",
        "screen_horizon",
        "screen_starts",
        "screen_check_every",
    ):
        _check(getattr(d, name) >= 1, f"dreamer.{name} must be >= 1")
    _check(d.model_lr >= 0, "dreamer.model_lr must be >= 0 (0: the size preset's)")
    for name in ("train_ratio", "actor_lr", "critic_lr"):
        _check(getattr(d, name) > 0, f"dreamer.{name} must be > 0")
    for name in ("model_grad_clip", "ac_grad_clip", "entropy", "kl_dyn", "kl_rep", "free_bits", "imagine_after"):
        _check(getattr(d, name) >= 0, f"dreamer.{name} must be >= 0")
    for name in ("gamma", "lam", "return_norm_rate", "slow_critic_rate"):
        _check(0 < getattr(d, name) <= 1, f"dreamer.{name} must be in (0, 1]")
    _check(0 <= d.unimix < 1, "dreamer.unimix must be in [0, 1)")
    _check(
        len(d.cnn_channels) == 3 and min(d.cnn_channels) >= 1,
        "dreamer.cnn_channels must be three positive widths (one per convolution)",
    )
    _check(d.cnn_features >= 1, "dreamer.cnn_features must be >= 1")
    _check(0 <= d.model_fraction <= 1, "dreamer.model_fraction must be in [0, 1]")
    _check(0 < d.screen_fraction <= 1, "dreamer.screen_fraction must be in (0, 1]")
    _check(
        d.enabled or not (d.model_rollouts or d.screen),
        "dreamer.model_rollouts and dreamer.screen need the Dreamer member: set dreamer.enabled=true",
    )


def _validate_backend(b: BackendConfig, population: int, envs_per_member: int) -> None:
    _check(b.kind in ("local", "ray"), f"backend.kind must be local or ray, got {b.kind!r}")
    address = b.address
    _check(
        address in ("", "auto") or bool(re.fullmatch(r"(ray://)?[^\s:/]+:\d{1,5}", address)),
        f"backend.address must be auto or HOST:PORT (empty: start a local Ray), got {address!r}",
    )
    _check(b.workers >= 0, "backend.workers must be >= 0 (0: from backend.envs_per_worker or the cluster's CPUs)")
    _check(b.envs_per_worker >= 0, "backend.envs_per_worker must be >= 0 (0: the members split evenly)")
    _check(b.start_timeout_s > 0, "backend.start_timeout_s must be > 0")
    _check(
        0 < b.call_timeout_s < math.inf,
        f"backend.call_timeout_s must be a finite number of seconds > 0, got {b.call_timeout_s}",
    )
    _check(
        b.envs_per_worker % envs_per_member == 0,
        f"backend.envs_per_worker ({b.envs_per_worker}) must be a multiple of env.envs_per_member "
        f"({envs_per_member}): an actor holds whole members",
    )
    _check(
        b.workers <= population,
        f"backend.workers ({b.workers}) is more than the population ({population}): an actor holds whole members",
    )
    _check(
        not (b.workers and b.envs_per_worker),
        "set only one of backend.workers and backend.envs_per_worker (the other follows from it)",
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


# ---------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    "debug": {
        "population": 4,
        "agent": {"hidden_sizes": [32, 32], "batch_size": 32},
        "replay": {"capacity": 5_000},
        "train": {
            "generations": 3,
            "steps_per_generation": 50,
            "updates_per_generation": 8,
            "accumulation_steps": 2,
            "warmup_steps": 100,
        },
        "env": {"max_episode_steps": 50},
        "evolution": {"elites": 1},
    },
    "pendulum": {
        # Fitness: 1 episode per member from a start state shared by all members (benchmarks/selection.py:
        # rank reliability 0.77, 0.85 with 2 episodes, which took 2.1x the env steps to reach -200).
        # K=1 and 12 generations (issue 15, 2026-12-02; were K=2 and 18): half the arithmetic a generation,
        # where the update is ~95% of the time. benchmarks/learning.py, seeds 0-2: the elite's held-out mean
        # reached -200 at 25,600 / 16,000 / 19,200 env steps (K=2: 22,400 / 19,200 / 19,200); the run ends at
        # 41,600, 5 generations after the slowest crossing. One torch thread: 2.4-2.6 min for the whole run at load
        # 2.4-3.6; with torch's 2 spinning threads the first generation had not ended after 3.7 min at load 3-5
        # (idle, 2 threads are ~1.4x faster per update: --set run.threads=0).
        "env": {"id": "Pendulum-v1"},
        "run": {"threads": 1},
        "agent": {"hidden_sizes": [64, 64], "batch_size": 128, "actor_lr": 1e-3, "critic_lr": 1e-3},
        "replay": {"capacity": 100_000},
        "train": {
            "generations": 12,
            "steps_per_generation": 0,
            "updates_per_generation": 1000,
            "accumulation_steps": 1,
            "warmup_steps": 3_200,
        },
    },
    "cartpole": {
        # Discrete actions (agent.algorithm auto -> sac_discrete); benchmarks/learning.py --preset cartpole.
        # gamma 0.995: a horizon of 200 steps sees a slow drift off the track coming (with 0.99 seed 2
        # plateaued near a held-out 300 for 76k env steps; with 0.995 it reached 490 at 7.2k).
        "env": {"id": "CartPole-v1"},
        "population": 8,
        "agent": {"hidden_sizes": [64, 64], "batch_size": 128, "actor_lr": 1e-3, "critic_lr": 1e-3, "gamma": 0.995},
        "replay": {"capacity": 100_000},
        "train": {
            "generations": 40,
            "steps_per_generation": 100,
            "updates_per_generation": 500,
            "accumulation_steps": 1,
            "warmup_steps": 2_000,
        },
    },
    "pong": {
        # Atari Pong (the atari extra): 84x84 frames stacked 4, Discrete(6) -> discrete SAC members with a
        # NatureCNN encoder each (agent.cnn_*), a frame replay of 50,000 transitions (issue 14's incident
        # shape, ~0.36 GB; SB3's Atari DQN uses 10,000). With dreamer.enabled=true the member is the incident's
        # (size atari: deter 200, 32x32 latents; NatureCNN encoder/decoder; batch 16 x sequence 50; ~12 s an
        # update on one CPU thread, benchmarks/pong_soak.py). Sized for one GPU: 16 members x batch 64, one
        # head layer of 256, 1,000 updates per generation against ~4,000 exploration steps plus every member's
        # full evaluation episode (mostly these: an untrained member's game is ~800 steps, a good one's
        # several thousand).
        "env": {"id": "ALE/Pong-v5"},
        "agent": {"hidden_sizes": [256], "batch_size": 64},
        "replay": {"capacity": 50_000},
        "train": {
            "generations": 300,
            "steps_per_generation": 250,
            "updates_per_generation": 1000,
            "accumulation_steps": 1,
            "warmup_steps": 20_000,
        },
        "dreamer": {"size": "atari", "batch_size": 16, "seq_len": 50},
    },
    "halfcheetah": {
        "env": {"id": "HalfCheetah-v5"},
        "replay": {"capacity": 1_000_000},
        "train": {
            "generations": 500,
            "steps_per_generation": 1000,
            "updates_per_generation": 1000,
            "accumulation_steps": 1,
            "warmup_steps": 25_000,
        },
    },
}
DEFAULT_PRESET = "pendulum"


# ---------------------------------------------------------------- building


def build_config(
    preset: str = DEFAULT_PRESET,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Preset (or ``base``, a saved config tree) -> YAML file -> ``key=value`` overrides ->
    ``extra`` (dotted keys), validated."""
    if base is not None:
        tree = from_dict(base).to_dict()
    elif preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    else:
        tree = Config().to_dict()
        _merge(tree, PRESETS[preset], "")
    if config_file is not None:
        _merge(tree, _read_yaml(Path(config_file)), "")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects section.key=value, got {item!r}")
        _set_dotted(tree, key.strip(), _parse_value(text))
    for key, value in (extra or {}).items():
        _set_dotted(tree, key, value)
    return from_dict(tree).validate()


def from_dict(tree: dict[str, Any]) -> Config:
    """Build a Config from a plain dict, checking every key and type (not ranges)."""
    return typing.cast(Config, _build(Config, tree, ""))


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown config key {prefix}{unknown[0]}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(typing.cast(type, hint), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_SCALAR_TYPES: dict[Any, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[]") for v in value]
    if origin in (typing.Union, types.UnionType):
        raise UserError(f"{key}: union types are not supported in config")
    accepted = _SCALAR_TYPES.get(hint, ())
    if isinstance(value, accepted) and (hint is bool or not isinstance(value, bool)):
        return float(typing.cast(float, value)) if hint is float else value
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # --set run.name=123 reads as a number
    if hint is float and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string
    raise UserError(f"{key} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


def _merge(tree: dict[str, Any], update: dict[str, Any], prefix: str) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value, f"{prefix}{key}.")
        else:
            if key not in tree:
                raise UserError(f"unknown config key {prefix}{key}")
            tree[key] = value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *path, leaf = key.split(".")
    node = tree
    for i, part in enumerate(path):
        if not isinstance(node.get(part), dict):
            raise UserError(f"unknown config section {'.'.join(path[: i + 1])} in {key!r}")
        node = node[part]
    if leaf not in node:
        raise UserError(f"unknown config key {key!r}")
    node[leaf] = value


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return data
