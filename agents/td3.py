"""TD3 for a whole population at once: deterministic actor, twin critics, target networks,
target policy smoothing and delayed actor updates (Fujimoto et al., 2018)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from agents.base import Batch, PopulationAgent, twin_critic_step
from agents.batched import BatchedMLP, FlatAdam, FlatParameters, mlp, per_member
from config import AgentConfig


class TD3Population(PopulationAgent):
    """``P`` TD3 members. Actions live in ``[-1, 1]``; the environment side rescales them."""

    ACTION_KIND = "box"
    HYPERPARAMETERS = ("actor_lr", "critic_lr", "gamma", "tau", "exploration_noise")
    EXPLORATION_ONLY = ("exploration_noise",)

    def __init__(self, population: int, obs_dim: int, act_dim: int, cfg: AgentConfig, device: torch.device):
        super().__init__()
        self.population = population
        self.cfg = cfg
        hidden = cfg.hidden_sizes
        self.actor = BatchedMLP(population, obs_dim, hidden, act_dim).to(device)
        self.critic1 = BatchedMLP(population, obs_dim + act_dim, hidden, 1).to(device)
        self.critic2 = BatchedMLP(population, obs_dim + act_dim, hidden, 1).to(device)
        self.actor_target = _frozen_copy(self.actor)
        self.critic1_target = _frozen_copy(self.critic1)
        self.critic2_target = _frozen_copy(self.critic2)
        # Each network group in one flat tensor (the modules' parameters become views of it): the
        # twin critics run as one network of 2P rows and each optimizer steps in a few ops.
        self.actor_flat = FlatParameters([self.actor])
        self.critic_flat = FlatParameters([self.critic1, self.critic2])
        self.actor_target_flat = FlatParameters([self.actor_target])
        self.critic_target_flat = FlatParameters([self.critic1_target, self.critic2_target])
        self.hyperparameters = {
            name: torch.full((population,), float(getattr(cfg, name)), device=device) for name in self.HYPERPARAMETERS
        }
        clip = cfg.max_grad_norm
        self.actor_opt = FlatAdam(self.actor_flat, self.hyperparameters["actor_lr"], max_grad_norm=clip)
        self.critic_opt = FlatAdam(self.critic_flat, self.hyperparameters["critic_lr"], max_grad_norm=clip)
        self.critic_updates = 0
        self._kernels = kernels(cfg.compile)

    # ------------------------------------------------------------ acting

    @torch.no_grad()
    def act(self, obs: Tensor, explore: bool, noise: Tensor | None = None) -> Tensor:
        action = self.actor(obs).tanh_()
        if explore:
            # Uniform draws become standard normal ones through the inverse normal CDF (tails cut at ~5 sigma).
            normal = torch.randn_like(action) if noise is None else torch.special.ndtri(noise.clamp(1e-7, 1 - 1e-7))
            action.add_(normal.mul_(per_member(self.hyperparameters["exploration_noise"], action))).clamp_(-1.0, 1.0)
        return action

    # ------------------------------------------------------------ learning

    def update(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        if self.cfg.fast_update:
            return self._fast_update(batches)
        metrics = self._update_critics(batches)
        self.critic_updates += 1
        if self.critic_updates % self.cfg.policy_delay == 0:
            metrics |= self._update_actor(batches)
            self._update_targets()
        return metrics

    def _update_critics(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        def twin_q(batch: Batch) -> tuple[Tensor, Tensor]:
            sa = torch.cat([batch.obs, batch.action], dim=-1)
            return self.critic1(sa).squeeze(-1), self.critic2(sa).squeeze(-1)

        return twin_critic_step(self, batches, self.critic_opt, twin_q, self._td_target)

    def _update_actor(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        self.actor_opt.zero_grad()
        critic_params = list(self.critic1.parameters())
        for p in critic_params:
            p.requires_grad_(False)
        loss_sum = torch.zeros(self.population, device=batches[0].obs.device)
        try:
            for batch in batches:
                action = torch.tanh(self.actor(batch.obs))
                q = self.critic1(torch.cat([batch.obs, action], dim=-1)).squeeze(-1)
                loss = -q.mean(1)  # (P,)
                (loss.sum() / len(batches)).backward()
                loss_sum += loss.detach()
        finally:
            for p in critic_params:
                p.requires_grad_(True)
        self.actor_opt.step()
        return {"actor_loss": (loss_sum / len(batches)).tolist()}

    @torch.no_grad()
    def _td_target(self, batch: Batch) -> Tensor:
        """Clipped double-Q target with target policy smoothing, ``(P, B)``."""
        noise = (torch.randn_like(batch.action) * self.cfg.policy_noise).clamp(
            -self.cfg.noise_clip, self.cfg.noise_clip
        )
        next_action = (torch.tanh(self.actor_target(batch.next_obs)) + noise).clamp(-1.0, 1.0)
        sa = torch.cat([batch.next_obs, next_action], dim=-1)
        next_q = torch.min(self.critic1_target(sa), self.critic2_target(sa)).squeeze(-1)
        gamma = self.hyperparameters["gamma"].unsqueeze(1)
        return batch.reward + gamma * (1.0 - batch.terminated) * next_q

    @torch.no_grad()
    def _update_targets(self) -> None:
        tau = self.hyperparameters["tau"]
        pairs = [
            (self.actor, self.actor_target),
            (self.critic1, self.critic1_target),
            (self.critic2, self.critic2_target),
        ]
        for online, target in pairs:
            for p, t in zip(online.parameters(), target.parameters(), strict=True):
                t.lerp_(p, per_member(tau, t))

    # ------------------------------------------------------------ learning, fused (agent.fast_update)

    def _fast_update(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        """The same step as the eager path in fewer, larger ops: the ``K`` micro-batches as one batch
        of ``K * B`` rows per member (the mean of ``K`` means of ``B`` is the mean of ``K * B``), the
        twin critics as one network of ``2P`` rows, gradients by ``torch.autograd.grad`` into one
        flat tensor per optimizer, one fused Adam step each, flat Polyak averaging and one host copy
        of all metrics. Same random draws as the eager path; float results equal up to rounding."""
        batch = concat(batches)
        target = self._fast_td_target(batch, len(batches))
        values = self._fast_critics(batch, target)
        names = ["critic_loss", "q_mean", "critic_grad_norm"]
        self.critic_updates += 1
        if self.critic_updates % self.cfg.policy_delay == 0:
            values.append(self._fast_actor(batch))
            names.append("actor_loss")
            self._fast_targets()
        return dict(zip(names, torch.stack(values).tolist(), strict=True))

    @torch.no_grad()
    def _fast_td_target(self, batch: Batch, micro_batches: int) -> Tensor:
        """:meth:`_td_target` of a concatenated batch, ``(P, K * B)``; the smoothing noise is drawn in
        one call, in the order the eager path draws it (micro-batch by micro-batch)."""
        p, rows, act = batch.action.shape
        noise = torch.randn(micro_batches, p, rows // micro_batches, act, device=batch.action.device)
        noise = noise.transpose(0, 1).reshape(p, rows, act)
        return self._kernels["td_target"](
            self.actor_target_flat.layers(self.actor_target_flat.flat),
            self.critic_target_flat.layers(self.critic_target_flat.flat),
            batch,
            noise,
            self.hyperparameters["gamma"],
            self.cfg.policy_noise,
            self.cfg.noise_clip,
        )

    def _fast_critics(self, batch: Batch, target: Tensor) -> list[Tensor]:
        """One step of both critics; returns ``[critic_loss, q_mean, critic_grad_norm]``, each ``(P,)``."""
        leaves = self.critic_flat.leaves()
        loss, q_mean = self._kernels["critic_loss"](_pairs(leaves), batch.obs, batch.action, target)
        retain = self.leaked_losses is not None
        grads = torch.autograd.grad(loss.sum(), leaves, retain_graph=retain)
        if self.leaked_losses is not None:
            self.leaked_losses.append(loss)
        norms = self.critic_opt.fused_step(FlatParameters.gather(grads))
        return [loss.detach(), q_mean.detach(), norms]

    def _fast_actor(self, batch: Batch) -> Tensor:
        """One actor step against critic 1 (its rows of the flat critics, no gradient); returns the loss ``(P,)``."""
        leaves = self.actor_flat.leaves()
        critic1 = self.critic_flat.layers(self.critic_flat.flat, group=0)
        loss = self._kernels["actor_loss"](_pairs(leaves), critic1, batch.obs)
        grads = torch.autograd.grad(loss.sum(), leaves)
        self.actor_opt.fused_step(FlatParameters.gather(grads))
        return loss.detach()

    @torch.no_grad()
    def _fast_targets(self) -> None:
        tau = self.hyperparameters["tau"].unsqueeze(1)
        self.actor_target_flat.flat.lerp_(self.actor_flat.flat, tau)
        self.critic_target_flat.flat.lerp_(self.critic_flat.flat, tau.repeat(2, 1))

    # ------------------------------------------------------------ members

    def actor_parameters(self) -> list[Tensor]:
        return list(self.actor.parameters())

    def actor_layers(self) -> list[list[Tensor]]:
        return self.actor.neuron_groups()

    def member_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for name in ("actor", "critic1", "critic2", "actor_target", "critic1_target", "critic2_target"):
            for pname, p in getattr(self, name).named_parameters():
                tensors[f"{name}.{pname}"] = p.data
        for name, opt in (("actor_opt", self.actor_opt), ("critic_opt", self.critic_opt)):
            for sname, s in opt.state_tensors().items():
                tensors[f"{name}.{sname}"] = s
        for name, hp in self.hyperparameters.items():
            tensors[f"hp.{name}"] = hp
        return tensors

    def extra_state(self) -> dict[str, int | float]:
        return {"critic_updates": self.critic_updates}

    def load_extra_state(self, state: dict[str, int | float]) -> None:
        self.critic_updates = int(state["critic_updates"])


def _td_target_kernel(
    actor_target: list[list[Tensor]],
    critic_targets: list[list[Tensor]],
    batch: Batch,
    noise: Tensor,
    gamma: Tensor,
    policy_noise: float,
    noise_clip: float,
) -> Tensor:
    """Clipped double-Q target ``(P, R)`` of ``batch`` (``(P, R, ...)``) with the standard-normal
    ``noise (P, R, act_dim)``; the critic targets are one network of ``2P`` rows."""
    p, rows, _ = noise.shape
    noise = (noise * policy_noise).clamp(-noise_clip, noise_clip)
    next_action = (torch.tanh(mlp(batch.next_obs, actor_target)) + noise).clamp(-1.0, 1.0)
    sa = torch.cat([batch.next_obs, next_action], dim=-1).repeat(2, 1, 1)  # (2P, R, in)
    next_q = mlp(sa, critic_targets).view(2, p, rows).amin(0)
    return batch.reward + gamma.unsqueeze(1) * (1.0 - batch.terminated) * next_q


def _critic_loss_kernel(
    critics: list[list[Tensor]], obs: Tensor, action: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """Both critics as one network of ``2P`` rows on ``(P, R, ...)``: (per-member loss, critic 1's
    summed with critic 2's ``(P,)``; critic 1's mean Q ``(P,)``)."""
    p = obs.shape[0]
    q = mlp(torch.cat([obs, action], dim=-1).repeat(2, 1, 1), critics).view(2, p, -1)
    return (q - target).pow(2).mean(2).sum(0), q[0].mean(1)


def _actor_loss_kernel(actor: list[list[Tensor]], critic1: list[list[Tensor]], obs: Tensor) -> Tensor:
    """Per-member actor loss ``(P,)``: minus critic 1's mean Q of the actor's actions at ``obs (P, R, obs_dim)``."""
    action = torch.tanh(mlp(obs, actor))
    return -mlp(torch.cat([obs, action], dim=-1), critic1).squeeze(-1).mean(1)


KERNELS: dict[str, Callable[..., Any]] = {
    "td_target": _td_target_kernel,
    "critic_loss": _critic_loss_kernel,
    "actor_loss": _actor_loss_kernel,
}
"""The fused update's pure tensor functions (no random draws, no state), which ``agent.compile`` compiles."""


def kernels(mode: str) -> dict[str, Callable[..., Any]]:
    """:data:`KERNELS`, each through ``torch.compile(mode=mode)`` unless ``mode`` is ``"none"``
    (compiled on first use; backward passes are compiled with them)."""
    if mode == "none":
        return dict(KERNELS)
    return {name: torch.compile(fn, mode=mode, dynamic=False) for name, fn in KERNELS.items()}


def _pairs(views: list[Tensor]) -> list[list[Tensor]]:
    """Per-parameter tensors ``[w0, b0, w1, b1, ...]`` as ``[[w0, b0], [w1, b1], ...]``."""
    return [views[i : i + 2] for i in range(0, len(views), 2)]


def concat(batches: Sequence[Batch]) -> Batch:
    """``K`` micro-batches of ``(P, B, ...)`` as one batch of ``(P, K * B, ...)``, micro-batch ``k`` in
    rows ``k * B .. (k + 1) * B`` (all must have the same ``B``)."""
    if len({b.obs.shape[1] for b in batches}) != 1:
        raise ValueError("micro-batches of one update must have the same size")
    if len(batches) == 1:
        return batches[0]
    return Batch(*(torch.cat(fields, dim=1) for fields in zip(*batches, strict=True)))


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
