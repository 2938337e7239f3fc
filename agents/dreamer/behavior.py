"""The actor-critic trained in imagination: lambda-returns, percentile return normalisation,
a two-hot critic with a slow EMA copy, REINFORCE actor with an entropy bonus (DreamerV3).

Imagined trajectories are ``(H + 1, N, ...)`` with index 0 the (real, posterior) start state.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from agents.dreamer.math import NUM_BINS, symlog_bins
from agents.dreamer.networks import ActionSpec, TwoHotHead, make_actor
from agents.dreamer.rssm import State
from agents.dreamer.sizes import DreamerSize
from agents.dreamer.world_model import WorldModel
from config import DreamerConfig


def lambda_returns(reward: Tensor, disc: Tensor, value: Tensor, lam: float) -> Tensor:
    """``reward (H, N)`` and ``disc (H, N)`` (discount x continue) of steps 1..H, ``value (H + 1, N)``
    of states 0..H -> returns ``(H, N)`` of states 0..H-1, bootstrapped with ``value[H]``."""
    out, last = [], value[-1]
    for i in reversed(range(reward.shape[0])):
        last = reward[i] + disc[i] * ((1 - lam) * value[i + 1] + lam * last)
        out.append(last)
    return torch.stack(out[::-1])


class ActorCritic(nn.Module):
    bins: Tensor
    return_lo: Tensor
    """EMA of the 5th percentile of imagined returns (a 0-dim buffer, in checkpoints)."""
    return_hi: Tensor
    """EMA of the 95th percentile."""

    def __init__(self, feat: int, action: ActionSpec, size: DreamerSize, cfg: DreamerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.actor = make_actor(action, feat, size.units, max(1, size.layers))
        self.critic = TwoHotHead(feat, size.units, max(1, size.layers), NUM_BINS)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.register_buffer("bins", symlog_bins(), persistent=False)
        self.register_buffer("return_lo", torch.zeros(()))
        self.register_buffer("return_hi", torch.zeros(()))

    @torch.no_grad()
    def imagine(self, wm: WorldModel, start: State, horizon: int, gen: torch.Generator | None) -> dict[str, Tensor]:
        """Roll the actor out in the model from ``start`` (``(N, ...)``) for ``horizon`` steps, without
        gradients: ``feat (H+1, N, F)``, ``raw_action (H, N, A)``, ``reward``/``cont (H, N)`` of steps 1..H."""
        state = {k: v.detach() for k, v in start.items()}
        feats, raws = [wm.rssm.feat(state)], []
        for _ in range(horizon):
            raw, action = self.actor.sample(feats[-1], gen)
            state, _ = wm.rssm.img_step(state, action, gen)
            feats.append(wm.rssm.feat(state))
            raws.append(raw)
        feat = torch.stack(feats)
        reward, cont = wm.heads(feat[1:])
        return {"feat": feat, "raw_action": torch.stack(raws), "reward": reward, "cont": cont}

    def value(self, feat: Tensor, slow: bool = False) -> Tensor:
        """Critic estimate ``(...)`` in raw units of ``feat (..., F)``."""
        head = self.slow_critic if slow else self.critic
        return head.mean(head(feat), self.bins)

    def _normalise(self, returns: Tensor) -> Tensor:
        """Update the 5th/95th-percentile EMAs with ``returns`` and give the scale ``max(1, hi - lo)``."""
        q = torch.quantile(returns.detach().flatten().float(), torch.tensor([0.05, 0.95], device=returns.device))
        rate = self.cfg.return_norm_rate
        for stat, value in ((self.return_lo, q[0]), (self.return_hi, q[1])):
            stat.copy_(torch.where(torch.isfinite(value), (1 - rate) * stat + rate * value, stat))  # NaN: kept
        return torch.clamp(self.return_hi - self.return_lo, min=1.0)

    def losses(self, traj: dict[str, Tensor], start_cont: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(actor loss, critic loss, detached metrics) of an imagined trajectory; ``start_cont (N,)``
        is 1 where the start state is not terminal."""
        cfg = self.cfg
        feat = traj["feat"]
        with torch.no_grad():
            value = self.value(feat)
            disc = cfg.gamma * traj["cont"]
            returns = lambda_returns(traj["reward"], disc, value, cfg.lam)
            weight = torch.cumprod(torch.cat([start_cont[None], disc[:-1]]), 0)
            scale = self._normalise(returns)
            advantage = (returns - value[:-1]) / scale
            slow_target = self.value(feat[:-1], slow=True)
        log_prob, entropy = self.actor.log_prob_entropy(feat[:-1], traj["raw_action"])
        actor_loss = -(weight * (log_prob * advantage + cfg.entropy * entropy)).mean()
        logits = self.critic(feat[:-1])
        critic_nll = self.critic.loss(logits, returns, self.bins) + self.critic.loss(logits, slow_target, self.bins)
        critic_loss = (weight * critic_nll).mean()
        metrics = {"entropy": entropy.detach().mean(), "imagined_return": returns.mean(), "return_scale": scale}
        return actor_loss, critic_loss, metrics

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        rate = self.cfg.slow_critic_rate
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters(), strict=True):
            slow.mul_(1 - rate).add_(fast, alpha=rate)
