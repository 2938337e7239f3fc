"""The Dreamer member in the generation loop: its model updates from the shared replay, its own
environments, its evaluation from the population's start states, and its checkpointed state.

It is an extra member ("16 + Dreamer"): ranked with the population and possibly the elite, but
evolution never replaces it or copies it (its architecture differs from a TD3 member's), and its
evaluation episodes are not added to the replay (the replay's ``E = P x envs_per_member`` columns
are fixed; the Dreamer member learns from the population's data)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from agents import PopulationAgent
from agents.dreamer import ActionSpec, DreamerAgent
from config import Config, UserError
from training.envs import EnvPool, make_env
from training.model_buffer import ModelBuffer
from training.replay import ReplayBuffer
from training.rollout import _one_cpu_thread, episode_quota, rollout
from training.staging import PinnedStaging

PREFIX = "dreamer."
"""Name prefix of the Dreamer member's tensors in a checkpoint."""
MODEL_BUFFER = f"{PREFIX}model_buffer."
"""Name prefix of the model buffer's tensors in a checkpoint."""


class SequenceReplay(Protocol):
    """What the member's updates read: ``ReplayBuffer`` and ``training.frames.FrameReplay`` both."""

    filled_rows: int

    def sample_sequences(
        self, batch: int, length: int, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """``(batch, length, ...)`` arrays of every replay field (fresh arrays that own their memory)."""
        ...


def member_rows(members: PopulationAgent, explore: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A policy over member-major rows: ``(P * S, obs_dim) -> (P * S, act_dim)``, rows ``p * S ...``
    acted on by member ``p`` (how the model rollouts and screening batch all members together)."""

    def act(obs: torch.Tensor) -> torch.Tensor:
        return members.act(obs.view(members.population, -1, obs.shape[-1]), explore).flatten(0, 1)

    return act


def toggle_refused(what: str, key: str, saved: bool) -> ValueError:
    """The one-line error for a checkpoint written with(out) ``what`` resumed the other way round."""
    written = "with" if saved else "without"
    return ValueError(
        f"the checkpoint was written {written} {what}; resume it with {key}={str(saved).lower()} "
        "(that state cannot be added or dropped)"
    )


class DreamerMember:
    """Owns a :class:`DreamerAgent`, its ``env.envs_per_member`` environments and the train-ratio
    carry. Acting and evaluation run under ``no_grad`` with detached filter state (``agent.act``)."""

    population = 1
    """One member, as ``training.rollout`` counts them."""

    def __init__(self, cfg: Config, obs_shape: tuple[int, ...], act_dim: int, device: torch.device, seed: int) -> None:
        d = cfg.dreamer
        if len(obs_shape) > 1 and (d.model_rollouts or d.screen):
            raise UserError(
                f"dreamer.model_rollouts and dreamer.screen are not yet supported with image observations "
                f"{obs_shape} (the members would act on decoded frames); set both false"
            )
        self.cfg = cfg
        self.device = device
        self.pool = EnvPool(lambda: make_env(cfg.env), cfg.env.envs_per_member)
        self.agent = DreamerAgent(obs_shape, ActionSpec(self.pool.action_kind, act_dim), d, device, seed)
        self.rng = np.random.default_rng(seed)
        """The member's own draws from the replay (the population's sampling is left unchanged)."""
        obs_dim = obs_shape[0]
        self.model_buffer = ModelBuffer(d.model_buffer, obs_dim, act_dim, seed + 1) if d.model_rollouts else None
        self.staging = PinnedStaging(device) if device.type == "cuda" else None
        """On CUDA its sequences reach the device through reusable pinned buffers (never views of storage)."""
        self.carry = 0.0
        """Fractional model updates owed (never more than one), so no generation gets a burst."""
        self.seen_env_steps = 0
        """The run's env-step count at the last :meth:`train`: steps after it earn updates."""

    # ------------------------------------------------------------ learning

    def updates_due(self, env_steps_total: int, trainable: bool) -> int:
        """Model updates earned by the env steps since the last call: ``steps * train_ratio /
        (batch_size * seq_len)`` plus the carried fraction. Steps taken while the replay cannot
        give sequences (warm-up) earn nothing."""
        d = self.cfg.dreamer
        new_steps = env_steps_total - self.seen_env_steps
        self.seen_env_steps = env_steps_total
        if not trainable:
            return 0
        owed = self.carry + new_steps * d.train_ratio / (d.batch_size * d.seq_len)
        updates = math.floor(owed)
        self.carry = owed - updates
        return updates

    def train(self, replay: SequenceReplay, updates: int, safe_point: Callable[[], None]) -> dict[str, float]:
        """``updates`` world-model + imagination updates on ``(batch_size, seq_len, ...)`` sequences
        from ``replay`` (flat vectors or frame stacks). Returns per-metric means (floats) with
        ``dreamer_`` names, ``dreamer_updates``, ``dreamer_train_s`` and ``dreamer_finite`` (0.0 when
        any update saw a non-finite loss or gradient)."""
        d = self.cfg.dreamer
        started = time.perf_counter()
        sums: dict[str, float] = {}
        finite = True
        for _ in range(updates):
            seq = replay.sample_sequences(d.batch_size, d.seq_len, self.rng)
            metrics = self.agent.train_step(self.staging.to_device(seq) if self.staging is not None else seq)
            finite &= metrics.pop("finite") > 0.5
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
            safe_point()
        out = {f"dreamer_{name}": total / updates for name, total in sums.items()}
        seconds = time.perf_counter() - started
        return out | {"dreamer_updates": float(updates), "dreamer_finite": float(finite), "dreamer_train_s": seconds}

    # ------------------------------------------------------------ imagination for the population

    @property
    def imagination_ready(self) -> bool:
        """Whether the world model has had ``dreamer.imagine_after`` updates (and so its rollouts
        and screening estimates are used)."""
        return self.agent.train_steps >= self.cfg.dreamer.imagine_after

    def branch_rollouts(self, replay: ReplayBuffer, members: PopulationAgent) -> dict[str, float]:
        """``rollout_starts`` real replay states per member, ``rollout_length`` model steps from each
        with that member's actor (its exploration noise on, as when it acts for real) -> the model
        buffer. Steps after a predicted termination and non-finite transitions are dropped."""
        d, started = self.cfg.dreamer, time.perf_counter()
        assert self.model_buffer is not None
        count, starts = members.population, d.rollout_starts
        obs = torch.as_tensor(replay.sample(count, starts, self.rng)["obs"], device=self.device).flatten(0, 1)

        with torch.no_grad():
            roll = self.agent.imagine_rollout(obs, member_rows(members, explore=True), d.rollout_length)
        ended_before = torch.cumsum(roll["terminated"].int(), 0) - roll["terminated"].int()
        keep = ended_before == 0  # (k, P * S): before and at the first predicted termination
        for name in ("obs", "next_obs", "action", "reward"):
            values = roll[name]
            keep &= torch.isfinite(values.view(*keep.shape, -1)).all(-1)
        fields = {
            name: roll[name][keep].cpu().numpy() for name in ("obs", "action", "reward", "next_obs", "terminated")
        }
        self.model_buffer.add(fields)
        return {
            "dreamer_model_added": float(keep.sum()),
            "dreamer_model_buffer": float(len(self.model_buffer)),
            "dreamer_rollout_s": time.perf_counter() - started,
        }

    def reward_error(
        self, replay: SequenceReplay, horizons: tuple[int, ...] = (1, 5, 10, 15), sequences: int = 16
    ) -> dict[str, float]:
        """Imagined vs real reward, open loop: from the first state of ``sequences`` real replay
        sequences the model is fed the real actions; ``dreamer_reward_error_h{h}`` is the mean absolute
        error of step ``h``'s predicted reward over sequences still in their first episode there."""
        length = max(horizons)
        if replay.filled_rows < length:
            return {}
        seq = replay.sample_sequences(sequences, length, self.rng)
        actions = torch.as_tensor(seq["action"], device=self.device).transpose(0, 1)  # (L, B, act_dim)
        with torch.no_grad():
            roll = self.agent.imagine_rollout(torch.as_tensor(seq["obs"][:, 0], device=self.device), actions, length)
        predicted = roll["reward"].cpu().numpy().T  # (B, L)
        started_new = np.cumsum(seq["is_first"][:, 1:], 1) > 0
        ended = np.cumsum(seq["terminated"][:, :-1], 1) > 0
        valid = np.concatenate([np.ones((len(predicted), 1), bool), ~(started_new | ended)], 1)
        error = np.abs(predicted - seq["reward"])
        out = {}
        for h in horizons:
            if valid[:, h - 1].any():
                out[f"dreamer_reward_error_h{h}"] = float(error[valid[:, h - 1], h - 1].mean())
        return out

    def screen(self, replay: ReplayBuffer, members: PopulationAgent) -> np.ndarray:
        """Imagined fitness ``(P,)`` of every member: the mean over ``screen_starts`` real replay
        states (the same for every member) of ``screen_horizon`` imagined rewards plus the Dreamer
        critic's discounted bootstrap (``DreamerAgent.imagined_return``). Non-finite gives -inf."""
        d = self.cfg.dreamer
        count, starts = members.population, d.screen_starts
        obs = torch.as_tensor(replay.sample(1, starts, self.rng)["obs"][0], device=self.device).repeat(count, 1)

        with torch.no_grad():
            policy = member_rows(members, explore=False)
            value = self.agent.imagined_return(obs, policy, d.screen_horizon).view(count, starts).mean(1)
        fitness = value.double().cpu().numpy()
        return np.where(np.isfinite(fitness), fitness, -np.inf)

    # ------------------------------------------------------------ acting and evaluation

    def act_streams(self, obs: np.ndarray, is_first: np.ndarray, explore: bool) -> np.ndarray:
        """``obs (N, *obs_shape)``, ``is_first (N,)`` -> actions ``(N, act_dim)`` float32 in ``[-1, 1]``;
        non-finite actions (a diverged model) become neutral ones, never a crash."""
        with torch.no_grad(), _one_cpu_thread(self.device):
            action = self.agent.act(torch.as_tensor(obs), torch.as_tensor(is_first), explore).cpu().numpy()
        return np.nan_to_num(action.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=-1.0)

    def evaluate(self, seeds: np.ndarray, on_step: Callable[[int], None]) -> tuple[float, int]:
        """Mean return of exactly ``train.eval_episodes`` noise-free episodes from the population's
        common start ``seeds`` (one per env, ``(envs_per_member,)``); returns (fitness, env steps).
        Non-finite returns give -inf."""
        quota = episode_quota(self.cfg.train.eval_episodes, len(self.pool), 1)
        self.agent.reset_state()
        result = rollout(self, self.pool, None, seeds, explore=False, episodes_per_stream=quota, on_step=on_step)
        fitness = float(result.member_fitness(1, quota)[0])
        return (fitness if math.isfinite(fitness) else -math.inf), result.env_steps

    # ------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Checkpoint tensors (``dreamer.*``: networks, optimizers, generator, filter state) and
        JSON meta (counters and the train-ratio carry)."""
        tensors = {f"{PREFIX}{name}": t for name, t in self.agent.state_tensors().items()}
        meta = {"agent": self.agent.extra_state(), "carry": self.carry, "seen_env_steps": self.seen_env_steps}
        meta["rng"] = self.rng.bit_generator.state
        if self.model_buffer is not None:
            buffer_tensors, meta["model_buffer"] = self.model_buffer.state()
            tensors |= {f"{MODEL_BUFFER}{name}": t for name, t in buffer_tensors.items()}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore :meth:`state`'s output (tensors with or without other entries); ValueError in one
        line when the saved member's shapes differ from this one's."""
        own = {
            name[len(PREFIX) :]: t
            for name, t in tensors.items()
            if name.startswith(PREFIX) and not name.startswith(MODEL_BUFFER)
        }
        try:
            self.agent.load_state_tensors(own)
        except (KeyError, RuntimeError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = (lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__)[:200]
            raise ValueError(f"the checkpoint's Dreamer member does not fit dreamer.* ({reason})") from None
        self.agent.load_extra_state(meta["agent"])
        self.carry = float(meta["carry"])
        self.seen_env_steps = int(meta["seen_env_steps"])
        if "rng" in meta:  # absent in checkpoints from before the member drew with its own rng
            self.rng.bit_generator.state = meta["rng"]
        self._load_model_buffer(tensors, meta)

    def _load_model_buffer(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        saved = meta.get("model_buffer")
        if (saved is None) != (self.model_buffer is None):
            raise toggle_refused("model rollouts", "dreamer.model_rollouts", saved is not None)
        if self.model_buffer is not None and saved is not None:
            own = {name[len(MODEL_BUFFER) :]: t for name, t in tensors.items() if name.startswith(MODEL_BUFFER)}
            self.model_buffer.load_state(own, saved)

    def close(self) -> None:
        self.pool.close()
