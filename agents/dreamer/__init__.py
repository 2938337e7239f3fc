"""The Dreamer world-model member (DreamerV3 recipe): math only, no I/O; never imports ``training``/``cloud``.

Interface for the generation loop (everything crossing it is detached; metrics are floats)::

    from agents.dreamer import ActionSpec, DreamerAgent
    agent = DreamerAgent(obs_shape=(obs_dim,), action=ActionSpec("box", act_dim), cfg=cfg.dreamer,
                         device=device, seed=seed)

    # learn: sequences from the shared replay, (B, L, ...) numpy arrays that own their memory
    seq = replay.sample_sequences(cfg.dreamer.batch_size, cfg.dreamer.seq_len)
    metrics = agent.train_step(seq)   # dict[str, float]: reconstruction, reward, continue, kl_dyn,
                                      # kl_rep, actor_loss, critic_loss, entropy, imagined_return,
                                      # return_scale, *_grad_norm, finite (0.0: NaN, update skipped)
    # updates per generation: env_steps * cfg.dreamer.train_ratio / (batch_size * seq_len)

    # act in the member's own envs (no_grad; per-env filter state cached, detached)
    action = agent.act(obs, is_first, explore=True)  # (N, obs_dim), (N,) bool -> (N, act_dim) in [-1, 1]
    agent.reset_state()                              # e.g. before evaluation episodes

    # imagination for the other members (no_grad, detached)
    roll = agent.imagine_rollout(start_obs, policy, steps=k)   # (B, obs_dim), obs->action callable
    # -> obs, next_obs (k, B, obs_dim), action (k, B, act_dim), reward, cont (k, B), terminated (k, B) bool
    score = agent.imagined_return(start_obs, policy)           # (B,): imagined return + critic bootstrap

    # checkpoints: plain tensors (stored as safetensors) + JSON
    tensors, extra = agent.state_tensors(), agent.extra_state()
    agent.load_state_tensors(tensors); agent.load_extra_state(extra)   # bit-exact resume

Pieces: ``math`` (symlog, two-hot over 255 bins, straight-through categoricals, KL with free bits),
``networks`` (encoder/decoder chosen by observation shape, actor chosen by ``ActionSpec``: Gaussian
for ``box``, categorical for ``discrete`` actions; image CNNs plug into the encoder factory), ``rssm``,
``world_model``, ``behavior`` (imagination actor-critic), ``sizes`` (``tiny``/``small``/``medium``/``large``
presets), ``agent``.

Deviations from DreamerV3, on purpose: plain global-norm gradient clipping (``model_grad_clip``,
``ac_grad_clip``) instead of adaptive clipping; Adam instead of LaProp; the initial latent state is
zeros (not learned); the continuous actor is a Gaussian with ``tanh`` mean clipped to ``[-1, 1]``.
The world model steps ``obs_t -> action_t -> next_obs_t`` per replay row (see ``world_model``), so
terminal observations are learned although the next row starts a new episode. Imagination starts from
every posterior state of the batch (``B * L`` starts); branched rollouts for other members start from
a single real observation (no history), since replay rows carry no latent state.
"""

from __future__ import annotations

from agents.dreamer.agent import DreamerAgent, Policy
from agents.dreamer.networks import ActionSpec
from agents.dreamer.sizes import SIZES, DreamerSize

__all__ = ["SIZES", "ActionSpec", "DreamerAgent", "DreamerSize", "Policy"]
