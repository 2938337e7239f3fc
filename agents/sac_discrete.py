"""Soft actor-critic for discrete actions, for a whole population at once (Christodoulou, 2019):
a categorical actor, twin Q critics with one output per action, Polyak-averaged target critics and
a learned entropy temperature per member.

With ``n`` actions every expectation over the policy is an exact sum over the ``n`` choices (no
sampling, no reparameterisation): the soft state value is ``sum_a pi(a|s) (min Q(s, a) - alpha log
pi(a|s))``. Actions cross the interface as one-hot rows of width ``n`` (``act_dim == n``), which is
also how the replay stores them; the environment side turns a row into its integer action.

With image observations ``(stack, H, W)`` uint8 every member has one CNN encoder
(:class:`agents.cnn.BatchedCNN`) shared by its actor and twin critics, and a Polyak-averaged target
encoder for the target critics. Only the critics' TD loss trains the encoder; the actor and the
temperature learn on detached features (SAC-AE, Yarats et al. 2019; DrQ, Kostrikov et al. 2020): the
TD error is the dense learning signal, and letting the actor's loss move the shared features as well
made SAC-AE's learning worse. Evolution mutates and crosses over the actor head, not the encoder,
which the member's critics read too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.base import Batch, PopulationAgent, twin_critic_step
from agents.batched import BatchedAdam, BatchedMLP, per_member
from agents.cnn import BatchedCNN
from config import AgentConfig


class DiscreteSACPopulation(PopulationAgent):
    """``P`` discrete SAC members over ``act_dim`` actions. Per member: ``actor_lr``, ``critic_lr``,
    ``gamma``, ``tau`` and ``target_entropy`` (a fraction of the largest entropy ``log(act_dim)``,
    which the temperature ``alpha`` is tuned to hold). ``obs_shape``: ``obs_dim`` (or ``(obs_dim,)``)
    for flat observations, ``(stack, H, W)`` for uint8 frame stacks (CNN members, ``agent.cnn_*``)."""

    ACTION_KIND = "discrete"
    IMAGES = True
    HYPERPARAMETERS = ("actor_lr", "critic_lr", "gamma", "tau", "target_entropy")

    def __init__(
        self, population: int, obs_shape: int | Sequence[int], act_dim: int, cfg: AgentConfig, device: torch.device
    ):
        super().__init__()
        self.population = population
        self.act_dim = act_dim
        self.cfg = cfg
        shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)
        self.encoder: BatchedCNN | None = None
        """Frame stacks only: each member's CNN, ``(P, B, stack, H, W)`` uint8 -> ``(P, B, cnn_features)``."""
        self.encoder_target: nn.Module | None = None
        inputs = shape[0]
        if len(shape) > 1:
            self.encoder = BatchedCNN(population, shape, cfg.cnn_channels, cfg.cnn_features, amp=cfg.amp).to(device)
            self.encoder_target = _frozen_copy(self.encoder)
            inputs = cfg.cnn_features
        hidden = cfg.hidden_sizes
        self.actor = BatchedMLP(population, inputs, hidden, act_dim).to(device)
        self.critic1 = BatchedMLP(population, inputs, hidden, act_dim).to(device)
        self.critic2 = BatchedMLP(population, inputs, hidden, act_dim).to(device)
        self.critic1_target = _frozen_copy(self.critic1)
        self.critic2_target = _frozen_copy(self.critic2)
        self.log_alpha = nn.Parameter(torch.full((population, 1), math.log(cfg.initial_alpha), device=device))
        """``(P, 1)``: log of each member's entropy temperature."""
        self.hyperparameters = {
            name: torch.full((population,), float(getattr(cfg, name)), device=device) for name in self.HYPERPARAMETERS
        }
        self.alpha_lr = torch.full((population,), cfg.alpha_lr, device=device)
        encoder_params = [] if self.encoder is None else list(self.encoder.parameters())
        critic_params = [*encoder_params, *self.critic1.parameters(), *self.critic2.parameters()]
        clip = cfg.max_grad_norm
        self.actor_opt = BatchedAdam(
            list(self.actor.parameters()), self.hyperparameters["actor_lr"], max_grad_norm=clip
        )
        self.critic_opt = BatchedAdam(critic_params, self.hyperparameters["critic_lr"], max_grad_norm=clip)
        self.alpha_opt = BatchedAdam([self.log_alpha], self.alpha_lr)

    # ------------------------------------------------------------ acting

    @torch.no_grad()
    def act(self, obs: Tensor, explore: bool, noise: Tensor | None = None) -> Tensor:
        """``obs (P, N, obs_dim)`` -> one-hot actions ``(P, N, act_dim)``: a draw from the policy
        when exploring (Gumbel-max on ``noise``, uniform draws ``(P, N, act_dim)``, or on torch's
        global generator without it), its most likely action otherwise."""
        logits = self.actor(self._features(obs))
        if explore:
            uniform = (torch.rand_like(logits) if noise is None else noise.clone()).clamp_(min=1e-20)
            logits = logits - uniform.log_().neg_().log_()
        return F.one_hot(logits.argmax(-1), self.act_dim).to(logits.dtype)

    # ------------------------------------------------------------ learning

    def update(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        metrics = self._update_critics(batches)
        metrics |= self._update_actor_and_temperature(batches)
        self._update_targets()
        return metrics

    def _features(self, obs: Tensor) -> Tensor:
        """What the heads read: ``obs (P, B, obs_dim)`` itself, or the encoder's ``(P, B, cnn_features)``
        of frame stacks ``(P, B, stack, H, W)`` uint8."""
        return obs if self.encoder is None else self.encoder(obs)

    def _target_features(self, obs: Tensor) -> Tensor:
        """:meth:`_features` through the target encoder (what the target critics read)."""
        return obs if self.encoder_target is None else self.encoder_target(obs)

    def _policy(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(probs, log_probs)`` of the actor at ``features (P, B, in)``, each ``(P, B, act_dim)``."""
        log_probs = F.log_softmax(self.actor(features), -1)
        return log_probs.exp(), log_probs

    def _update_critics(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        def twin_q(batch: Batch) -> tuple[Tensor, Tensor]:  # Q of the taken (one-hot) action; trains the encoder
            features = self._features(batch.obs)
            return (self.critic1(features) * batch.action).sum(-1), (self.critic2(features) * batch.action).sum(-1)

        return twin_critic_step(self, batches, self.critic_opt, twin_q, self._td_target)

    def _update_actor_and_temperature(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        """Actor: minimise ``sum_a pi(a|s) (alpha log pi(a|s) - min Q(s, a))``; then the temperature:
        ``log_alpha`` rises while the policy's entropy is below its target and falls above it."""
        self.actor_opt.zero_grad()
        loss_sum = torch.zeros(self.population, device=batches[0].obs.device)
        entropy_sum = torch.zeros_like(loss_sum)
        alpha = self.log_alpha.detach().exp()  # (P, 1)
        for batch in batches:
            with torch.no_grad():  # the actor learns on detached features
                features = self._features(batch.obs)
                q = torch.min(self.critic1(features), self.critic2(features))  # (P, B, n)
            probs, log_probs = self._policy(features)
            loss = (probs * (alpha.unsqueeze(-1) * log_probs - q)).sum(-1).mean(1)  # (P,)
            (loss.sum() / len(batches)).backward()
            loss_sum += loss.detach()
            entropy_sum += -(probs.detach() * log_probs.detach()).sum(-1).mean(1)
        self.actor_opt.step()
        k = len(batches)
        entropy = entropy_sum / k
        target = self.hyperparameters["target_entropy"] * math.log(self.act_dim)
        self.alpha_opt.zero_grad()
        alpha_loss = (self.log_alpha.squeeze(1) * (entropy - target)).sum()
        alpha_loss.backward()
        self.alpha_opt.step()
        return {
            "actor_loss": (loss_sum / k).tolist(),
            "entropy": entropy.tolist(),
            "alpha": self.log_alpha.detach().exp().squeeze(1).tolist(),
        }

    @torch.no_grad()
    def _td_target(self, batch: Batch) -> Tensor:
        """Soft clipped double-Q target ``(P, B)``: the exact expectation over the next policy."""
        probs, log_probs = self._policy(self._features(batch.next_obs))
        target_features = self._target_features(batch.next_obs)
        next_q = torch.min(self.critic1_target(target_features), self.critic2_target(target_features))
        alpha = self.log_alpha.exp().unsqueeze(-1)  # (P, 1, 1)
        next_v = (probs * (next_q - alpha * log_probs)).sum(-1)
        gamma = self.hyperparameters["gamma"].unsqueeze(1)
        return batch.reward + gamma * (1.0 - batch.terminated) * next_v

    @torch.no_grad()
    def _update_targets(self) -> None:
        tau = self.hyperparameters["tau"]
        pairs: list[tuple[nn.Module, nn.Module]] = [
            (self.critic1, self.critic1_target),
            (self.critic2, self.critic2_target),
        ]
        if self.encoder is not None and self.encoder_target is not None:
            pairs.append((self.encoder, self.encoder_target))
        for online, target in pairs:
            for p, t in zip(online.parameters(), target.parameters(), strict=True):
                t.lerp_(p, per_member(tau, t))

    # ------------------------------------------------------------ members

    def actor_parameters(self) -> list[Tensor]:
        """The actor head (the encoder is the critics' too: evolution leaves it alone)."""
        return list(self.actor.parameters())

    def actor_layers(self) -> list[list[Tensor]]:
        return self.actor.neuron_groups()

    def member_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        networks = ["actor", "critic1", "critic2", "critic1_target", "critic2_target"]
        networks += ["encoder", "encoder_target"] if self.encoder is not None else []
        for name in networks:
            for pname, p in getattr(self, name).named_parameters():
                tensors[f"{name}.{pname}"] = p.data
        tensors["log_alpha"] = self.log_alpha.data
        for name, opt in (
            ("actor_opt", self.actor_opt),
            ("critic_opt", self.critic_opt),
            ("alpha_opt", self.alpha_opt),
        ):
            for sname, s in opt.state_tensors().items():
                tensors[f"{name}.{sname}"] = s
        for name, hp in self.hyperparameters.items():
            tensors[f"hp.{name}"] = hp
        return tensors


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
