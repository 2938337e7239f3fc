"""Scalar transforms and distributions of the Dreamer member: symlog, two-hot, categorical latents.

Shapes: every function here is elementwise over leading dimensions ``(...)``; a two-hot
vector adds a trailing ``(bins,)``, a categorical latent is ``(..., groups, classes)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_BINS = 255
"""Two-hot bins of the reward head and critic."""
BIN_RANGE = 20.0
"""Bins are equally spaced over ``[-20, 20]`` in symlog space (symexp-spaced in raw units)."""


def symlog(x: Tensor) -> Tensor:
    """``sign(x) * log(1 + |x|)``: compresses large magnitudes, identity-like near 0."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: Tensor) -> Tensor:
    """Inverse of :func:`symlog`: ``sign(x) * (exp(|x|) - 1)``."""
    return torch.sign(x) * torch.expm1(x.abs())


def symlog_bins(device: torch.device | None = None, bins: int = NUM_BINS) -> Tensor:
    """``(bins,)`` bin centres in symlog space; ``symexp`` of them are the raw-unit centres."""
    return torch.linspace(-BIN_RANGE, BIN_RANGE, bins, device=device)


def two_hot(x: Tensor, bins: Tensor) -> Tensor:
    """Encode ``x (...)`` (already in the bins' space) as ``(..., K)`` weights on the two nearest
    bins, so that ``(weights * bins).sum(-1) == x`` for ``x`` within the bins' range."""
    x = x.clamp(bins[0], bins[-1])
    below = (torch.searchsorted(bins, x.contiguous(), right=True) - 1).clamp(0, len(bins) - 2)
    lo, hi = bins[below], bins[below + 1]
    w_hi = (x - lo) / (hi - lo)
    out = torch.zeros(*x.shape, len(bins), device=x.device, dtype=x.dtype)
    out.scatter_(-1, below.unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, (below + 1).unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def two_hot_loss(logits: Tensor, target: Tensor, bins: Tensor) -> Tensor:
    """Cross-entropy ``(...)`` of ``logits (..., K)`` against the two-hot of ``symlog(target (...))``."""
    return -(two_hot(symlog(target), bins) * F.log_softmax(logits, -1)).sum(-1)


def two_hot_mean(logits: Tensor, bins: Tensor) -> Tensor:
    """Expected value ``(...)`` in raw units of a two-hot head's ``logits (..., K)``."""
    return symexp((F.softmax(logits, -1) * bins).sum(-1))


def unimix_logits(logits: Tensor, unimix: float) -> Tensor:
    """Log-probabilities of ``(1 - unimix) * softmax(logits) + unimix / classes`` over the last axis."""
    probs = F.softmax(logits, -1)
    probs = (1 - unimix) * probs + unimix / logits.shape[-1]
    return torch.log(probs)


def sample_straight_through(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One-hot sample ``(..., K)`` of ``logits (..., K)`` whose gradient is the probabilities'
    (straight-through: forward value one-hot, backward d/dprobs)."""
    probs = F.softmax(logits, -1)
    # A non-finite row (a diverged batch) draws from any class instead of raising; the NaN still
    # flows through ``probs`` into the loss, where the caller's ``finite`` check reports it.
    flat = torch.nan_to_num(probs.detach().reshape(-1, probs.shape[-1]), nan=1.0, posinf=1.0, neginf=0.0)
    index = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    one_hot = F.one_hot(index, probs.shape[-1]).to(probs.dtype)
    return one_hot + probs - probs.detach()


def categorical_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(p || q)`` of ``(..., groups, classes)`` categorical latents, summed over groups: ``(...)``."""
    log_p, log_q = F.log_softmax(logits_p, -1), F.log_softmax(logits_q, -1)
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


def free_bits_kl(post: Tensor, prior: Tensor, free: float) -> tuple[Tensor, Tensor, Tensor]:
    """KL balancing terms of posterior/prior logits ``(..., groups, classes)``.

    Returns ``(dyn, rep, raw)``, each ``(...)``: ``dyn = max(free, KL(sg(post) || prior))`` trains the
    prior, ``rep = max(free, KL(post || sg(prior)))`` trains the posterior, ``raw`` is the plain KL
    (detached). Below ``free`` nats a term is constant, so it gives no gradient."""
    dyn = categorical_kl(post.detach(), prior)
    rep = categorical_kl(post, prior.detach())
    return dyn.clamp(min=free), rep.clamp(min=free), dyn.detach()
