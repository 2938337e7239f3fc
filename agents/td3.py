"""TD3 for a whole population at once: deterministic actor, twin critics, target networks,
target policy smoothing and delayed actor updates (Fujimoto et al., 2018)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from agents.base import Batch, PopulationAgent
from agents.batched import BatchedAdam, BatchedLinear, BatchedMLP, per_member
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
        self.hyperparameters = {
            name: torch.full((population,), float(getattr(cfg, name)), device=device) for name in self.HYPERPARAMETERS
        }
        critic_params = [*self.critic1.parameters(), *self.critic2.parameters()]
        self.actor_opt = BatchedAdam(
            list(self.actor.parameters()), self.hyperparameters["actor_lr"], max_grad_norm=cfg.max_grad_norm
        )
        self.critic_opt = BatchedAdam(critic_params, self.hyperparameters["critic_lr"], max_grad_norm=cfg.max_grad_norm)
        self.critic_updates = 0

    # ------------------------------------------------------------ acting

    @torch.no_grad()
    def act(self, obs: Tensor, explore: bool) -> Tensor:
        action = self.actor(obs).tanh_()
        if explore:
            noise = torch.randn_like(action).mul_(per_member(self.hyperparameters["exploration_noise"], action))
            action.add_(noise).clamp_(-1.0, 1.0)
        return action

    # ------------------------------------------------------------ learning

    def update(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        metrics = self._update_critics(batches)
        self.critic_updates += 1
        if self.critic_updates % self.cfg.policy_delay == 0:
            metrics |= self._update_actor(batches)
            self._update_targets()
        return metrics

    def _update_critics(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        self.critic_opt.zero_grad()
        loss_sum = torch.zeros(self.population, device=batches[0].obs.device)
        q_sum = torch.zeros_like(loss_sum)
        for batch in batches:
            target = self._td_target(batch)  # (P, B), no graph
            sa = torch.cat([batch.obs, batch.action], dim=-1)
            q1 = self.critic1(sa).squeeze(-1)
            q2 = self.critic2(sa).squeeze(-1)
            loss = (q1 - target).pow(2).mean(1) + (q2 - target).pow(2).mean(1)  # (P,)
            # Members own disjoint parameters, so the sum's gradient is each member's own.
            (loss.sum() / len(batches)).backward(retain_graph=self.leaked_losses is not None)
            if self.leaked_losses is not None:
                self.leaked_losses.append(loss)
            loss_sum += loss.detach()
            q_sum += q1.detach().mean(1)
        grad_norm = self.critic_opt.step()
        k = len(batches)
        return {
            "critic_loss": (loss_sum / k).tolist(),
            "q_mean": (q_sum / k).tolist(),
            "critic_grad_norm": grad_norm.tolist(),
        }

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

    # ------------------------------------------------------------ members

    def actor_parameters(self) -> list[Tensor]:
        return list(self.actor.parameters())

    def actor_layers(self) -> list[list[Tensor]]:
        layers: list[BatchedLinear] = list(self.actor.layers)  # type: ignore[arg-type]
        return [[layer.weight, layer.bias] for layer in layers]

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


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
