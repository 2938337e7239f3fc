"""``DreamerAgent``: one Dreamer member (world model + imagination actor-critic), its acting filter,
imagination helpers for other members, and its complete state for checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from agents.base import device_dtype
from agents.dreamer.behavior import ActorCritic
from agents.dreamer.networks import ActionSpec, Actor, Encoder
from agents.dreamer.rssm import RSSM, State
from agents.dreamer.sizes import SIZES
from agents.dreamer.world_model import WorldModel
from config import DreamerConfig, UserError

Policy = Callable[[Tensor], Tensor]
"""``obs (B, obs_dim) -> action (B, act_dim)`` in ``[-1, 1]``, e.g. a TD3 member's actor."""
SEQ_FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "is_first")
STATE_VERSION = 1


ActingNets = tuple[Encoder, RSSM, Actor]
"""What a Dreamer member acts with: its world model's encoder and RSSM, and its actor head."""


@torch.no_grad()
def filter_act(
    nets: ActingNets,
    obs: Tensor,
    is_first: Tensor,
    state: State | None,
    prev: Tensor | None,
    gen: torch.Generator | None,
    explore: bool,
) -> tuple[State, Tensor]:
    """One acting step of the member's filter: ``obs (N, *obs_shape)`` (on the nets' device),
    ``is_first (N,)`` bool, the previous step's ``state`` (``deter (N, D)``, ``stoch (N, G, K)``) and
    action ``prev (N, act_dim)`` -> (the new state, detached; actions ``(N, act_dim)``: in ``[-1, 1]``
    for ``box``, one-hot rows for ``discrete``). Without a previous state (or when ``N`` changes)
    every stream starts from ``obs`` alone; otherwise streams where ``is_first`` do. Draws from
    ``gen``: the posterior of a fresh start for all ``N`` streams, then (with a previous state) the
    filter step's posterior, then (``explore``) the action; noise-free actions are the actor's mode."""
    encoder, rssm, actor = nets
    embed = encoder(obs)
    start = rssm.start(embed, gen)
    if state is None or prev is None or prev.shape[0] != obs.shape[0]:
        state = start
    else:
        cont, _, _ = rssm.obs_step(state, prev, embed, gen)
        first = is_first.to(obs.device, torch.bool)
        state = {k: torch.where(first.view(-1, *[1] * (v.dim() - 1)), start[k], cont[k]) for k, v in cont.items()}
    feat = rssm.feat(state)
    action = actor.sample(feat, gen)[1] if explore else actor.mode(feat).clamp(-1, 1)
    return {k: v.detach() for k, v in state.items()}, action.detach()


class DreamerAgent:
    """One Dreamer member. Built deterministically from ``seed`` without touching the global RNG;
    every random draw afterwards comes from its own ``torch.Generator``."""

    def __init__(
        self, obs_shape: tuple[int, ...], action: ActionSpec, cfg: DreamerConfig, device: torch.device, seed: int
    ) -> None:
        if cfg.size not in SIZES:
            raise UserError(f"dreamer.size must be one of {', '.join(SIZES)}, got {cfg.size!r}")
        size = SIZES[cfg.size]
        self.cfg, self.device, self.action = cfg, device, action
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.wm = WorldModel(obs_shape, action.dim, size, cfg).to(device)
            self.ac = ActorCritic(self.wm.rssm.feat_dim, action, size, cfg).to(device)
        self.nets = nn.ModuleDict({"wm": self.wm, "ac": self.ac})
        self.optimizers = {
            "wm": torch.optim.Adam(self.wm.parameters(), lr=cfg.model_lr or size.model_lr, eps=1e-8),
            "actor": torch.optim.Adam(self.ac.actor.parameters(), lr=cfg.actor_lr, eps=1e-5),
            "critic": torch.optim.Adam(self.ac.critic.parameters(), lr=cfg.critic_lr, eps=1e-5),
        }
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.train_steps = 0
        self._act_state: State | None = None
        self._act_prev: Tensor | None = None

    # ------------------------------------------------------------------ training

    def _tensors(self, seq: Mapping[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        """The sequence fields on the device as float32, except frames: uint8 observations travel as
        uint8 (a quarter of the bytes) and the image encoder scales them there."""
        out = {k: torch.as_tensor(seq[k]).to(self.device, device_dtype(seq[k])) for k in SEQ_FIELDS}
        out["is_first"] = out["is_first"] > 0.5
        return out

    def _step(self, name: str, loss: Tensor, params: list[Tensor], clip: float) -> Tensor:
        """Backward, clip, and step ``name``'s optimizer unless the loss or gradient is not finite.
        Returns the gradient norm (a 0-dim tensor)."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if bool(torch.isfinite(loss) & torch.isfinite(norm)):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm.detach()

    def train_step(self, seq: Mapping[str, np.ndarray | Tensor]) -> dict[str, float]:
        """One world-model update and one imagination actor-critic update from a sequence batch
        (``replay.sample_sequences``: ``obs``/``next_obs (B, L, obs_dim)``, ``action (B, L, act_dim)``,
        ``reward``/``terminated``/``is_first (B, L)``). Returns Python floats only; ``finite`` is 0.0
        when a loss or gradient was NaN/inf (that update was skipped)."""
        cfg, data = self.cfg, self._tensors(seq)
        wm_loss, terms, states = self.wm.loss(data, self.gen)
        wm_norm = self._step("wm", wm_loss, list(self.wm.parameters()), cfg.model_grad_clip)
        start = {k: v.detach().flatten(0, 1) for k, v in states.items()}
        del wm_loss, states
        traj = self.ac.imagine(self.wm, start, cfg.horizon, self.gen)
        actor_loss, critic_loss, ac_terms = self.ac.losses(traj, 1.0 - data["terminated"].flatten())
        actor_norm = self._step("actor", actor_loss, list(self.ac.actor.parameters()), cfg.ac_grad_clip)
        critic_norm = self._step("critic", critic_loss, list(self.ac.critic.parameters()), cfg.ac_grad_clip)
        self.ac.update_slow_critic()
        self.train_steps += 1
        named = {**terms, "actor_loss": actor_loss.detach(), "critic_loss": critic_loss.detach(), **ac_terms}
        named |= {"model_grad_norm": wm_norm, "actor_grad_norm": actor_norm, "critic_grad_norm": critic_norm}
        values = torch.stack([v.float().reshape(()) for v in named.values()]).tolist()
        out = dict(zip(named, values, strict=True))
        out["finite"] = float(all(np.isfinite(v) for v in values))
        return out

    # ------------------------------------------------------------------ acting

    def reset_state(self) -> None:
        """Forget every env's filter state (the next ``act`` treats all envs as episode starts)."""
        self._act_state, self._act_prev = None, None

    @torch.no_grad()
    def act(self, obs: Tensor, is_first: Tensor, explore: bool) -> Tensor:
        """``obs (N, obs_dim)``, ``is_first (N,)`` bool -> actions ``(N, act_dim)`` in ``[-1, 1]``.
        Keeps a detached filter state per env; where ``is_first`` (or on the first call, or when ``N``
        changes) an env's state restarts from ``obs`` alone (:func:`filter_act`)."""
        obs = obs.to(self.device, device_dtype(obs))
        state, prev = self._act_state, self._act_prev
        nets = (self.wm.encoder, self.wm.rssm, self.ac.actor)
        self._act_state, self._act_prev = filter_act(nets, obs, is_first, state, prev, self.gen, explore)
        return self._act_prev

    # ------------------------------------------------------------------ imagination for others

    def _actions(self, policy: Policy | Tensor | None, step: int, obs: Tensor, feat: Tensor) -> Tensor:
        if policy is None:
            return self.ac.actor.mode(feat).clamp(-1, 1)
        if isinstance(policy, Tensor):
            return policy[step].to(self.device, torch.float32)
        return policy(obs).to(self.device, torch.float32).clamp(-1, 1)

    @torch.no_grad()
    def imagine_rollout(self, start_obs: Tensor, policy: Policy | Tensor | None, steps: int) -> dict[str, Tensor]:
        """Branched model rollout from real ``start_obs (B, obs_dim)`` (each starts a fresh filter
        state from that observation alone) for ``steps`` steps. ``policy`` maps decoded observations
        to actions, or is a tensor of actions ``(steps, B, act_dim)``, or ``None`` (this member's actor,
        noise-free). Returns detached transitions: ``obs``/``next_obs (steps, B, obs_dim)`` (``obs[0]``
        is ``start_obs``), ``action (steps, B, act_dim)``, ``reward (steps, B)``, ``terminated (steps, B)``
        bool (continue probability < 0.5), and ``cont (steps, B)`` the continue probabilities."""
        return self._rollout(start_obs, policy, steps)[0]

    def _rollout(
        self, start_obs: Tensor, policy: Policy | Tensor | None, steps: int
    ) -> tuple[dict[str, Tensor], Tensor]:
        """:meth:`imagine_rollout`, plus the last state's features ``(B, F)``."""
        obs = start_obs.to(self.device, device_dtype(start_obs))
        state = self.wm.rssm.start(self.wm.encoder(obs), self.gen)
        out: dict[str, list[Tensor]] = {"obs": [], "action": [], "next_obs": [], "reward": [], "cont": []}
        for step in range(steps):
            action = self._actions(policy, step, obs, self.wm.rssm.feat(state))
            state, _ = self.wm.rssm.img_step(state, action, self.gen)
            feat = self.wm.rssm.feat(state)
            reward, cont = self.wm.heads(feat)
            next_obs = self.wm.decoder.observation(self.wm.decoder(feat))
            for key, value in zip(out, (obs, action, next_obs, reward, cont), strict=True):
                out[key].append(value)
            obs = next_obs
        result = {k: torch.stack(v).detach() for k, v in out.items()}
        result["terminated"] = result["cont"] < 0.5
        return result, self.wm.rssm.feat(state).detach()

    @torch.no_grad()
    def imagined_return(self, start_obs: Tensor, policy: Policy | None, horizon: int | None = None) -> Tensor:
        """Screening estimate ``(B,)``: discounted imagined reward over ``horizon`` (default
        ``cfg.horizon``) steps from ``start_obs (B, obs_dim)`` under ``policy`` (``None``: this member's
        actor), plus ``gamma^H`` times this member's critic at the last state, all weighted by the
        predicted continue probabilities."""
        horizon = self.cfg.horizon if horizon is None else horizon
        roll, last_feat = self._rollout(start_obs, policy, horizon)
        gamma = self.cfg.gamma
        alive = torch.ones_like(roll["reward"][0])
        total = torch.zeros_like(alive)
        for step in range(horizon):
            total += gamma**step * alive * roll["reward"][step]
            alive = alive * roll["cont"][step]
        return (total + gamma**horizon * alive * self.ac.value(last_feat)).detach()

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, Tensor]:
        """Every tensor of this member's state, flat names, cloned: parameters and buffers
        (``net.*``: world model, actor, critic, slow critic, return-normalisation percentiles),
        optimizer state (``opt.<name>.<index>.<key>``), the generator (``rng``) and the acting
        filter state (``act.*``, present once ``act`` ran)."""
        out = {f"net.{k}": v.detach().clone() for k, v in self.nets.state_dict().items()}
        for name, opt in self.optimizers.items():
            for index, slots in opt.state_dict()["state"].items():
                out |= {f"opt.{name}.{index}.{k}": v.detach().clone() for k, v in slots.items()}
        out["rng"] = self.gen.get_state()
        if self._act_state is not None and self._act_prev is not None:
            out |= {f"act.{k}": v.clone() for k, v in self._act_state.items()}
            out["act.prev_action"] = self._act_prev.clone()
        return out

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`state_tensors` gave (onto this agent's device)."""
        nets = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        self.nets.load_state_dict(nets, strict=True)
        for name, opt in self.optimizers.items():
            state: dict[int, dict[str, Tensor]] = {}
            prefix = f"opt.{name}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, slot = key[len(prefix) :].split(".", 1)
                    state.setdefault(int(index), {})[slot] = value.clone()
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        self.gen.set_state(tensors["rng"].clone())
        if "act.prev_action" in tensors:
            self._act_state = {k: tensors[f"act.{k}"].to(self.device).clone() for k in ("deter", "stoch")}
            self._act_prev = tensors["act.prev_action"].to(self.device).clone()
        else:
            self.reset_state()

    def extra_state(self) -> dict[str, Any]:
        """JSON counters (everything else is in :meth:`state_tensors`)."""
        return {"version": STATE_VERSION, "train_steps": self.train_steps}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"dreamer state version {state.get('version')!r} is not {STATE_VERSION}")
        self.train_steps = int(state["train_steps"])
