"""The exported Dreamer member (``evorl-policy/3``): what it needs to act (its world model's encoder
and RSSM, its actor head and its sampling generator) as safetensors + JSON, and
:class:`DreamerPolicy`, the stateful policy :func:`agents.load_policy` gives back for it.

```
evorl-policy/3 (Dreamer: encoder -> RSSM filter -> actor mode; the latent state is sampled)
DIR/policy.safetensors   encoder.<name>, rssm.<name>, actor.<name>: the state_dict entries of
                         agents.dreamer's make_encoder / RSSM / make_actor modules, float32;
                         generator_state (5056,) uint8: the member's torch.Generator (cpu) state
DIR/policy.json          format, architecture (input, encoder, rssm, actor, output, sampling), the
                         dreamer config and size preset the networks were built with, spaces, env
```

The policy runs the trainer's own modules and acting step (:func:`agents.dreamer.agent.filter_act`),
so for the same observations, episode starts and generator state its actions are the trainer's
member's, bit for bit. Not exported: the decoder, reward and continue heads, the critics and the
optimizers (nothing that acting reads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agents.dreamer.agent import ActingNets, DreamerAgent, filter_act
from agents.dreamer.networks import ActionSpec, make_actor, make_encoder
from agents.dreamer.rssm import RSSM, State
from agents.dreamer.sizes import SIZES
from agents.policy import (
    FORMAT_V3,
    INFO,
    WEIGHTS,
    PolicyFileError,
    _write,
    observation_batch,
    rebuilt_net,
    scale_actions,
)

GENERATOR = "generator_state"
"""The tensor holding the sampling generator's state (``torch.Generator().get_state()``, uint8)."""
PARTS = ("encoder", "rssm", "actor")
"""Name prefixes of the acting modules' tensors, in :data:`agents.dreamer.agent.ActingNets` order."""
GAUSSIAN_STD = (0.1, 1.0)
"""``BoundedGaussianActor``'s std range (its defaults, which the trainer builds)."""
ACTOR_UNIMIX = 0.01
"""``CategoricalActor``'s uniform mix (its default, which the trainer builds)."""


@dataclass(frozen=True)
class DreamerNet:
    """The shape of a Dreamer member's acting networks: observations ``obs_shape`` (``(obs_dim,)``
    float vectors through an MLP encoder, or ``(stack, H, W)`` uint8 frames through the NatureCNN-
    shaped one of ``cnn_channels`` and ``cnn_features``), an RSSM of a ``deter`` GRU state and
    ``groups`` x ``classes`` categorical latents, and an actor over ``act_dim`` ``box`` or
    ``discrete`` actions; MLPs are ``layers`` x ``units`` wide."""

    obs_shape: tuple[int, ...]
    action_kind: str
    act_dim: int
    deter: int
    units: int
    layers: int
    groups: int
    classes: int
    unimix: float
    cnn_channels: tuple[int, ...] = ()
    cnn_features: int = 0

    @classmethod
    def of(cls, agent: DreamerAgent, obs_shape: tuple[int, ...]) -> DreamerNet:
        """The net a trainer's ``agent`` (built for observations of ``obs_shape``) acts with."""
        size, cfg, frames = SIZES[agent.cfg.size], agent.cfg, len(obs_shape) == 3
        return cls(
            tuple(int(s) for s in obs_shape),
            agent.action.kind,
            agent.action.dim,
            size.deter,
            size.units,
            max(1, size.layers),  # as WorldModel and ActorCritic build them
            size.groups,
            size.classes,
            float(cfg.unimix),
            tuple(int(c) for c in cfg.cnn_channels) if frames else (),
            int(cfg.cnn_features) if frames else 0,
        )

    @property
    def frames(self) -> bool:
        return len(self.obs_shape) == 3

    def modules(self) -> ActingNets:
        """Encoder, RSSM and actor of this shape on the ``meta`` device (no memory, no random
        init): for their tensor names and shapes, and to receive the exported tensors."""
        with torch.device("meta"):
            encoder = make_encoder(self.obs_shape, self.units, self.layers, list(self.cnn_channels), self.cnn_features)
            rssm = RSSM(encoder.out_dim, self.act_dim, self.deter, self.groups, self.classes, self.units, self.unimix)
            actor = make_actor(ActionSpec(self.action_kind, self.act_dim), rssm.feat_dim, self.units, self.layers)
        return encoder, rssm, actor

    def tensor_shapes(self) -> dict[str, list[int]]:
        """Every tensor's name and shape in ``policy.safetensors``."""
        shapes = {GENERATOR: list(torch.Generator().get_state().shape)}
        for prefix, module in zip(PARTS, self.modules(), strict=True):
            shapes |= {f"{prefix}.{name}": list(t.shape) for name, t in module.state_dict().items()}
        return shapes

    def architecture(self) -> dict[str, Any]:
        """The JSON's ``architecture``: everything needed to rebuild the networks and act."""
        mlp = "layers x (Linear without bias, LayerNorm, SiLU)"
        if self.frames:
            encoder: dict[str, Any] = {
                "kind": "cnn",
                "channels": list(self.cnn_channels),
                "kernels": [8, 4, 3],
                "strides": [4, 2, 1],
                "features": self.cnn_features,
                "activation": "silu after each convolution and the linear layer",
            }
        else:
            encoder = {"kind": "mlp", "units": self.units, "layers": self.layers, "mlp": mlp}
        box = self.action_kind == "box"
        actor: dict[str, Any] = {"kind": "gaussian" if box else "categorical", "units": self.units}
        actor |= {"layers": self.layers, "actions": self.act_dim}
        actor |= {"std_range": list(GAUSSIAN_STD)} if box else {"unimix": ACTOR_UNIMIX}
        return {
            "kind": "dreamer",
            "modules": "agents.dreamer: make_encoder, RSSM, make_actor (tensors: their state_dict, prefixed)",
            "input": {
                "shape": list(self.obs_shape),
                "dtype": "uint8" if self.frames else "float32",
                "scaling": "x / 255 - 0.5" if self.frames else "symlog(x) = sign(x) * log(1 + |x|)",
            },
            "encoder": encoder,
            "rssm": {
                "deter": self.deter,
                "groups": self.groups,
                "classes": self.classes,
                "units": self.units,
                "unimix": self.unimix,
                "initial_state": "zeros; an episode's first state is the posterior of its first observation",
            },
            "actor": actor,
            "output": {
                "kind": self.action_kind,
                "rule": "the actor's mean (tanh) clipped to [-1, 1], rescaled to the action box (action_scaling)"
                if box
                else "first_action + argmax of the actor's mode (one-hot)",
            },
            "sampling": "each step samples the posterior latents (categorical) from generator_state's torch.Generator",
        }

    @classmethod
    def from_architecture(cls, arch: Any) -> DreamerNet:
        """The net an ``architecture`` JSON names (KeyError, TypeError or ValueError when it names none)."""
        encoder, rssm, actor = arch["encoder"], arch["rssm"], arch["actor"]
        frames = encoder["kind"] == "cnn"
        net = cls(
            tuple(int(s) for s in arch["input"]["shape"]),
            str(arch["output"]["kind"]),
            int(actor["actions"]),
            int(rssm["deter"]),
            int(rssm["units"]),
            int(actor["layers"]),
            int(rssm["groups"]),
            int(rssm["classes"]),
            float(rssm["unimix"]),
            tuple(int(c) for c in encoder["channels"]) if frames else (),
            int(encoder["features"]) if frames else 0,
        )
        if not net.consistent():
            raise ValueError(f"{net} is no network DreamerPolicy runs")
        return net

    def consistent(self) -> bool:
        """Whether the modules can be built: positive widths, vectors or 3 convolutions over frames
        of at least 36x36, ``box`` or ``discrete`` actions."""
        widths = (self.act_dim, self.deter, self.units, self.layers, self.groups, self.classes)
        ok = min(widths) >= 1 and self.action_kind in ("box", "discrete") and 0.0 <= self.unimix < 1.0
        if self.frames:
            convs = len(self.cnn_channels) == 3 and min(self.cnn_channels) >= 1 and self.cnn_features >= 1
            return ok and convs and min(self.obs_shape) >= 1 and min(self.obs_shape[1:]) >= 36
        return ok and len(self.obs_shape) == 1 and self.obs_shape[0] >= 1 and not self.cnn_channels


def dreamer_member(agent: DreamerAgent, obs_shape: tuple[int, ...]) -> tuple[DreamerNet, dict[str, Tensor]]:
    """A trainer's Dreamer ``agent``: its :class:`DreamerNet` and the tensors it acts with, by their
    names in the file (its generator's state included), for :func:`save_dreamer_policy`."""
    net = DreamerNet.of(agent, obs_shape)
    tensors = {GENERATOR: agent.gen.get_state()}
    for prefix, module in zip(PARTS, (agent.wm.encoder, agent.wm.rssm, agent.ac.actor), strict=True):
        tensors |= {f"{prefix}.{name}": t for name, t in module.state_dict().items()}
    return net, tensors


def save_dreamer_policy(folder: Path, net: DreamerNet, tensors: dict[str, Tensor], info: dict[str, Any]) -> list[Path]:
    """Write :func:`dreamer_member`'s ``net`` and ``tensors`` as :data:`FORMAT_V3`: ``info`` plus
    ``architecture``, tensor shapes and sha256. Returns both paths."""
    found = {name: list(t.shape) for name, t in tensors.items()}
    if found != net.tensor_shapes() or tensors[GENERATOR].dtype != torch.uint8:
        raise ValueError(f"the tensors {found} are not the network {net} (or not a cpu generator's state)")
    return _write(folder, tensors, {"architecture": net.architecture(), **info}, FORMAT_V3)


class DreamerPolicy:
    """The exported Dreamer member, stateful: it follows ``n`` episodes side by side, each with its
    RSSM state (``deter (n, D)``, ``stoch (n, G, K)``) and previous action.

    ``reset(n=1, seed=None)`` starts ``n`` episodes; ``policy(obs, is_first=None)`` takes one
    observation (``n == 1``) or ``(n, *obs_shape)``, advances every stream's state and returns
    actions in the env's units (``box``: float32 ``(act_dim,)`` / ``(n, act_dim)``; ``discrete``:
    ``np.int64`` / ``(n,)``). The first call after ``reset`` starts every stream from its
    observation; later, ``is_first (n,)`` bool marks the streams whose ``obs`` starts a new episode.

    Sampling: like the trainer's member, every step samples the posterior latents, from
    :attr:`generator` (a cpu ``torch.Generator``; the global RNG is never used). It starts in the
    state the member's generator had at the exported checkpoint, so the first episodes after loading
    are those ``evaluate --member dreamer`` plays; ``reset(seed=s)`` reseeds it (``manual_seed(s)``)
    for draws that repeat from any point. Actions are noise-free (the actor's mode)."""

    def __init__(self, net: DreamerNet, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        modules = net.modules()
        for prefix, module in zip(PARTS, modules, strict=True):
            own = {name[len(prefix) + 1 :]: t for name, t in tensors.items() if name.startswith(f"{prefix}.")}
            module.load_state_dict(own, strict=True, assign=True)
            module.requires_grad_(False).eval()
        self.nets: ActingNets = modules
        self.net, self.info = net, info
        """``info``: the export's JSON (env config and wrappers, dreamer config, generation, fitness, ...)."""
        self.generator = torch.Generator()
        self.generator.set_state(tensors[GENERATOR])
        if net.action_kind == "box":
            space = info["action_space"]
            self.low, self.high = np.asarray(space["low"], np.float32), np.asarray(space["high"], np.float32)
        else:
            self.first_action = int(info["action_space"]["start"])
        self.streams = 1
        self._state: State | None = None
        self._prev: Tensor | None = None

    def reset(self, n: int = 1, seed: int | None = None) -> None:
        """Start ``n`` episodes (every stream's next observation is its first); with ``seed``, reseed
        :attr:`generator` (else its draws continue)."""
        if int(n) < 1:
            raise ValueError(f"reset needs n >= 1 episodes, got {n}")
        self.streams, self._state, self._prev = int(n), None, None
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def __call__(self, obs: np.ndarray, is_first: np.ndarray | bool | None = None) -> np.ndarray:
        """``obs`` ``obs_shape`` (one stream) or ``(n, *obs_shape)``, ``is_first`` None or bool ``(n,)``
        -> actions in the env's units (see the class). ValueError (one line) for observations of
        another shape or dtype, another number of streams than :meth:`reset` started, or an
        ``is_first`` that is not ``n`` bools."""
        x, single = observation_batch(obs, self.net.obs_shape, self.net.frames)
        if len(x) != self.streams:
            raise ValueError(
                f"the policy follows {self.streams} episode(s), got {len(x)} observation(s); "
                f"call reset(n={len(x)}) to start {len(x)}"
            )
        first = self._is_first(is_first)
        with torch.inference_mode():
            self._state, self._prev = filter_act(self.nets, x, first, self._state, self._prev, self.generator, False)
            raw = self._prev.numpy().astype(np.float32, copy=False)
        action = np.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=-1.0)  # as the trainer's member acts
        out = scale_actions(action, self.low, self.high) if self.net.action_kind == "box" else self._choice(action)
        return out[0] if single else out

    def _choice(self, one_hot: np.ndarray) -> np.ndarray:
        """One-hot rows ``(n, act_dim)`` -> int64 choices ``(n,)``, as the trainer's env pool steps them."""
        return (one_hot.argmax(-1) + self.first_action).astype(np.int64)

    def _is_first(self, is_first: np.ndarray | bool | None) -> Tensor:
        """``is_first`` as a bool ``(n,)`` tensor (None: no stream starts a new episode)."""
        if is_first is None:
            return torch.zeros(self.streams, dtype=torch.bool)
        flags = np.asarray(is_first)
        if flags.dtype != np.bool_ or flags.size != self.streams or flags.ndim > 1:
            raise ValueError(f"is_first must be {self.streams} bool(s), got {flags.shape} {flags.dtype}")
        return torch.as_tensor(flags.reshape(self.streams))


def load_dreamer(tensors: dict[str, Tensor], info: dict[str, Any], folder: Path) -> DreamerPolicy:
    """The :data:`FORMAT_V3` policy: its architecture must be exactly the one this loader writes for
    the network it names, the tensors (and the JSON's list of them) exactly that network's, the
    action space the actor's. PolicyFileError (one line) otherwise."""
    net: DreamerNet = rebuilt_net(DreamerNet, info, folder, "Dreamer filter, actor")
    found = {name: list(t.shape) for name, t in tensors.items()}
    floats = all(t.dtype == torch.float32 for name, t in tensors.items() if name != GENERATOR)
    if found != net.tensor_shapes() or found != info.get("tensors") or not floats:
        raise PolicyFileError(f"{folder / WEIGHTS} does not hold the network that {INFO} describes")
    if tensors[GENERATOR].dtype != torch.uint8 or not _action_space_fits(info.get("action_space"), net):
        raise PolicyFileError(f"{folder / INFO}: the generator state or action_space does not fit the network")
    try:
        return DreamerPolicy(net, tensors, info)
    except RuntimeError as err:  # e.g. a generator state that is no mt19937 state
        raise PolicyFileError(f"{folder / WEIGHTS} cannot be loaded: {str(err).splitlines()[0][:200]}") from None


def _action_space_fits(space: Any, net: DreamerNet) -> bool:
    """Whether the JSON's ``action_space`` is a box of ``(act_dim,)`` finite bounds or ``Discrete(act_dim)``."""
    try:
        if net.action_kind == "box":
            low, high = np.asarray(space["low"], np.float32), np.asarray(space["high"], np.float32)
            return low.shape == high.shape == (net.act_dim,) and bool(np.isfinite(low).all() & np.isfinite(high).all())
        return space["kind"] == "discrete" and int(space["n"]) == net.act_dim and isinstance(space["start"], int)
    except (KeyError, TypeError, ValueError):
        return False


__all__ = ["DreamerNet", "DreamerPolicy", "dreamer_member", "load_dreamer", "save_dreamer_policy"]
