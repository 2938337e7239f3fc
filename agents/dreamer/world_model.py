"""The world model: encoder, RSSM, decoder, reward and continue heads, and its loss on sequences.

A sequence batch holds, per row ``t`` of ``(B, L)``: ``obs``, ``action``, ``reward``, ``next_obs``,
``terminated``, ``is_first`` (the replay's layout). The model filters ``obs_t -> (action_t) -> next_obs_t``:
where ``is_first_t`` the state restarts from the posterior of ``obs_t`` alone; otherwise it continues
from the previous row's state (whose observation was ``next_obs_{t-1} == obs_t``). The state after
``next_obs_t`` predicts ``reward_t``, ``1 - terminated_t`` and reconstructs ``next_obs_t``, so terminal
observations are seen even though the next row starts a new episode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.dreamer.math import NUM_BINS, free_bits_kl, symlog_bins
from agents.dreamer.networks import TwoHotHead, make_decoder, make_encoder, mlp
from agents.dreamer.rssm import RSSM, State
from agents.dreamer.sizes import DreamerSize
from config import DreamerConfig


class WorldModel(nn.Module):
    bins: Tensor

    def __init__(self, obs_shape: tuple[int, ...], act_dim: int, size: DreamerSize, cfg: DreamerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(obs_shape, size.units, max(1, size.layers), cfg.cnn_channels, cfg.cnn_features)
        self.rssm = RSSM(self.encoder.out_dim, act_dim, size.deter, size.groups, size.classes, size.units, cfg.unimix)
        feat = self.rssm.feat_dim
        self.decoder = make_decoder(obs_shape, feat, size.units, size.layers, cfg.cnn_channels)
        self.reward = TwoHotHead(feat, size.units, size.layers, NUM_BINS)
        self.cont = mlp(feat, size.units, size.layers, 1)
        self.register_buffer("bins", symlog_bins(), persistent=False)

    def filter(self, seq: dict[str, Tensor], gen: torch.Generator | None) -> tuple[State, Tensor, Tensor]:
        """Posterior states after each ``next_obs``: ``deter (B, L, D)``, ``stoch (B, L, G, K)``, and
        posterior and prior logits ``(B, L, G, K)``."""
        B, L = seq["is_first"].shape
        restarts = seq["is_first"].clone()
        restarts[:, 0] = True  # only these rows' obs are needed (elsewhere obs_t is next_obs_{t-1})
        first = self.rssm.start(self.encoder(seq["obs"][restarts]), gen)  # (R, ...) in row-major order
        slot = torch.cumsum(restarts.flatten(), 0).view(B, L) - 1  # row (b, t) -> its index in ``first``
        embed_next = self.encoder(seq["next_obs"])
        state, posts, post_logits, prior_logits = None, [], [], []
        for t in range(L):
            restart = {k: v[slot[:, t]] for k, v in first.items()}
            if state is None:
                state = restart
            else:
                mask = restarts[:, t]
                state = {k: torch.where(mask.view(-1, *[1] * (v.dim() - 1)), restart[k], v) for k, v in state.items()}
            state, post, prior = self.rssm.obs_step(state, seq["action"][:, t], embed_next[:, t], gen)
            posts.append(state)
            post_logits.append(post)
            prior_logits.append(prior)
        stacked = {k: torch.stack([s[k] for s in posts], 1) for k in posts[0]}
        return stacked, torch.stack(post_logits, 1), torch.stack(prior_logits, 1)

    def loss(self, seq: dict[str, Tensor], gen: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor], State]:
        """(total loss, detached per-term means, posterior states ``(B, L, ...)``)."""
        cfg = self.cfg
        states, post, prior = self.filter(seq, gen)
        feat = self.rssm.feat(states)
        recon = self.decoder.loss(self.decoder(feat), seq["next_obs"]).mean()
        reward = self.reward.loss(self.reward(feat), seq["reward"], self.bins).mean()
        cont_target = 1.0 - seq["terminated"]
        cont = F.binary_cross_entropy_with_logits(self.cont(feat).squeeze(-1), cont_target)
        dyn, rep, raw_kl = free_bits_kl(post, prior, cfg.free_bits)
        total = recon + reward + cont + cfg.kl_dyn * dyn.mean() + cfg.kl_rep * rep.mean()
        terms = {"reconstruction": recon, "reward": reward, "continue": cont, "kl_dyn": raw_kl.mean()}
        terms = {k: v.detach() for k, v in terms.items()}
        terms["kl_rep"] = terms["kl_dyn"]  # the same KL value; the two terms differ only in where gradients go
        return total, terms, states

    def heads(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted reward (raw units) and continue probability, each ``(...)``, of ``feat (..., F)``."""
        return self.reward.mean(self.reward(feat), self.bins), torch.sigmoid(self.cont(feat).squeeze(-1))
