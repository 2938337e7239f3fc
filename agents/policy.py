"""An exported actor: a safetensors file of its weights plus a small JSON, and the loader that
turns them into a plain callable ``obs -> action`` (numpy in, numpy out).

Two formats, both read by :func:`load_policy`:

```
evorl-policy/1 (TD3: MLP, tanh output rescaled to the action box)
DIR/policy.safetensors   layers.<i>.weight (in, out) and layers.<i>.bias (out,), float32
DIR/policy.json          format, architecture, spaces, action scaling, where it came from

evorl-policy/2 (discrete SAC: an optional CNN encoder of uint8 frame stacks, MLP logits, argmax)
DIR/policy.safetensors   encoder.conv.<i>.weight (out, in, k, k), encoder.conv.<i>.bias (out,),
                         encoder.linear.weight (in, out), encoder.linear.bias (out,)  [frames only]
                         layers.<i>.weight (in, out), layers.<i>.bias (out,), float32
DIR/policy.json          the same, with architecture.input / .encoder / .head / .output

evorl-policy/3 (the Dreamer member: encoder, RSSM filter, actor; stateful, see agents.dreamer_policy)
DIR/policy.safetensors   encoder.*, rssm.*, actor.* (float32), generator_state (uint8)
DIR/policy.json          the same, with architecture.input / .encoder / .rssm / .actor / .output
```

Loading reads JSON and safetensors only (no pickle): it never executes code from the files. The
loaded policy needs no trainer, replay or cloud client::

    from agents import load_policy
    policy = load_policy("exported/")
    action = policy(obs)            # TD3: obs (obs_dim,) -> action (act_dim,), in the env's units
    actions = policy(batch)         # (N, obs_dim) -> (N, act_dim)
    action = policy(frames)         # discrete: (stack, H, W) uint8 or (obs_dim,) -> int64 scalar
    actions = policy(batch)         # (N, stack, H, W) or (N, obs_dim) -> (N,) int64
    policy.reset(n=N)               # Dreamer: start N episodes, then policy(obs (N, ...), is_first)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from agents.batched import BatchedMLP
from agents.cnn import KERNELS, STRIDES, BatchedCNN, conv_output_size

if TYPE_CHECKING:
    from agents.dreamer_policy import DreamerPolicy

FORMAT = "evorl-policy/1"
"""TD3 exports (:class:`Policy`); still written for them, so older loaders read them too."""
FORMAT_V2 = "evorl-policy/2"
"""Discrete-SAC exports (:class:`DiscretePolicy`)."""
FORMAT_V3 = "evorl-policy/3"
"""Dreamer-member exports (:class:`agents.dreamer_policy.DreamerPolicy`)."""
FORMATS = (FORMAT, FORMAT_V2, FORMAT_V3)
WEIGHTS, INFO = "policy.safetensors", "policy.json"


class PolicyFileError(ValueError):
    """An exported policy folder that is missing, damaged or of another format (one line)."""


class Policy:
    """A deterministic MLP actor: ``relu`` hidden layers, ``tanh`` output in ``[-1, 1]``, rescaled
    to the action box ``[low, high]`` as the trainer's env pool rescales (and clipped to it).

    ``layers``: ``[(weight (in, out), bias (out,)), ...]``; ``low``/``high``: ``(act_dim,)``."""

    def __init__(self, layers: list[tuple[Tensor, Tensor]], low: np.ndarray, high: np.ndarray, info: dict[str, Any]):
        sizes = [layers[0][0].shape[0], *(w.shape[1] for w, _ in layers)]
        with torch.random.fork_rng(devices=[]):  # the initial weights are replaced: leave the caller's generator alone
            self.net = BatchedMLP(1, sizes[0], sizes[1:-1], sizes[-1])
        with torch.no_grad():
            for layer, (weight, bias) in zip(self.net.layers, layers, strict=True):
                layer.weight.copy_(weight.unsqueeze(0))  # type: ignore[operator]
                layer.bias.copy_(bias.view(1, 1, -1))  # type: ignore[operator]
        self.net.requires_grad_(False)
        self.low, self.high = low.astype(np.float32), high.astype(np.float32)
        self.obs_dim, self.act_dim = int(sizes[0]), int(sizes[-1])
        self.info = info
        """The export's JSON: env id, generation, member, fitness, config hash, ..."""

    def normalized(self, obs: np.ndarray) -> np.ndarray:
        """``obs (obs_dim,)`` or ``(N, obs_dim)`` -> float32 actions in ``[-1, 1]``, ``(act_dim,)`` or
        ``(N, act_dim)``."""
        x = np.asarray(obs, np.float32)
        if x.shape[-1:] != (self.obs_dim,) or x.ndim not in (1, 2):
            raise ValueError(f"expected observations of shape ({self.obs_dim},) or (N, {self.obs_dim}), got {x.shape}")
        with torch.inference_mode():
            out = self.net(torch.as_tensor(x).reshape(1, -1, self.obs_dim)).tanh_()[0].numpy()
        out = np.nan_to_num(out.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=-1.0)
        return out[0] if x.ndim == 1 else out

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """``obs (obs_dim,)`` or ``(N, obs_dim)`` -> actions in the env's units, same leading shape, float32."""
        return scale_actions(self.normalized(obs), self.low, self.high)


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` actions ``(..., act_dim)`` -> the box ``[low, high]`` (float32, clipped), as training does."""
    return np.clip(low + (actions + 1.0) * 0.5 * (high - low), low, high)


@dataclass(frozen=True)
class DiscreteNet:
    """The shape of a discrete-SAC actor: ``obs_shape`` ``(obs_dim,)`` (the head reads observations)
    or ``(stack, H, W)`` uint8 frames through a NatureCNN-shaped encoder (``channels`` wide,
    ``features`` out: :class:`agents.cnn.BatchedCNN`); an MLP head of ``sizes`` (in, hidden..., actions)
    whose logits' argmax, plus ``first_action`` (the ``Discrete`` space's start), is the action."""

    obs_shape: tuple[int, ...]
    sizes: tuple[int, ...]
    channels: tuple[int, ...] = ()
    features: int = 0
    first_action: int = 0

    def flat_features(self) -> int:
        """Values the encoder's convolutions hand its linear layer (``channels[-1] * side_h * side_w``)."""
        return self.channels[-1] * conv_output_size(self.obs_shape[1]) * conv_output_size(self.obs_shape[2])

    def tensor_shapes(self) -> dict[str, list[int]]:
        """Every tensor's name and shape in ``policy.safetensors``."""
        shapes: dict[str, list[int]] = {}
        if self.channels:
            widths = [self.obs_shape[0], *self.channels]
            for i, (inp, out, k) in enumerate(zip(widths[:-1], widths[1:], KERNELS, strict=True)):
                shapes[f"encoder.conv.{i}.weight"], shapes[f"encoder.conv.{i}.bias"] = [out, inp, k, k], [out]
            shapes["encoder.linear.weight"] = [self.flat_features(), self.features]
            shapes["encoder.linear.bias"] = [self.features]
        for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=False)):
            shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"] = [a, b], [b]
        return shapes

    def architecture(self) -> dict[str, Any]:
        """The JSON's ``architecture``: everything needed to compute the actions from the tensors."""
        frames = bool(self.channels)
        arch: dict[str, Any] = {
            "kind": "cnn_mlp" if frames else "mlp",
            "input": {
                "shape": list(self.obs_shape),
                "dtype": "uint8" if frames else "float32",
                "scaling": "x / 255 as float32 (values in [0, 1])" if frames else "none",
            },
            "head": {"sizes": list(self.sizes), "hidden_activation": "relu", "output_activation": "none (logits)"},
            "output": {
                "kind": "argmax",
                "actions": self.sizes[-1],
                "first_action": self.first_action,
                "rule": "action = first_action + argmax(logits), the first of equal maxima",
            },
            "layer": "y = x @ weight + bias, weight (in, out)",
        }
        if frames:
            widths = [self.obs_shape[0], *self.channels]
            arch["encoder"] = {
                "convolutions": [
                    {"in_channels": a, "out_channels": b, "kernel": k, "stride": s, "padding": 0, "activation": "relu"}
                    for a, b, k, s in zip(widths[:-1], widths[1:], KERNELS, STRIDES, strict=True)
                ],
                "convolution": "torch.nn.functional.conv2d(x, weight (out, in, k, k), bias, stride), no dilation",
                "flatten": "each sample's (C, H, W) feature map in row-major order, as torch.flatten",
                "linear": {"in": self.flat_features(), "out": self.features, "activation": "relu"},
                "features": self.features,
            }
        return arch

    @classmethod
    def from_architecture(cls, arch: Any) -> DiscreteNet:
        """The net an ``architecture`` JSON names (KeyError, TypeError or ValueError when it names none)."""
        encoder = arch.get("encoder")
        channels = [c["out_channels"] for c in encoder["convolutions"]] if encoder is not None else []
        net = cls(
            tuple(int(s) for s in arch["input"]["shape"]),
            tuple(int(s) for s in arch["head"]["sizes"]),
            tuple(int(c) for c in channels),
            int(encoder["features"]) if encoder is not None else 0,
            int(arch["output"]["first_action"]),
        )
        if not net.consistent():
            raise ValueError(f"{net} is no network DiscretePolicy runs")
        return net

    def consistent(self) -> bool:
        """Whether the widths fit together: vectors straight into the head, or three convolutions
        over frames of at least 36x36 whose features feed the head."""
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            return False
        if not self.channels:
            return self.obs_shape == self.sizes[:1]
        frames = len(self.obs_shape) == 3 and min(self.obs_shape) >= 1
        fit = frames and min(conv_output_size(s) for s in self.obs_shape[1:]) >= 1
        return fit and len(self.channels) == len(KERNELS) and min(self.channels) >= 1 and self.features == self.sizes[0]


def _named_rows(encoder: BatchedCNN | None, actor: BatchedMLP, slot: int) -> dict[str, Tensor]:
    """Member ``slot``'s rows of the encoder's and actor's parameters, by their names in the file
    (views: writing them writes the modules)."""
    named: dict[str, Tensor] = {}
    if encoder is not None:
        for i, (weight, bias) in enumerate(zip(encoder.weights, encoder.biases, strict=True)):
            named[f"encoder.conv.{i}.weight"], named[f"encoder.conv.{i}.bias"] = weight[slot], bias[slot]
        named["encoder.linear.weight"] = encoder.linear.weight[slot]
        named["encoder.linear.bias"] = encoder.linear.bias[slot, 0]
    for i, (weight, bias) in enumerate(actor.neuron_groups()):
        named[f"layers.{i}.weight"], named[f"layers.{i}.bias"] = weight[slot], bias[slot, 0]
    return named


def discrete_member(
    encoder: BatchedCNN | None, actor: BatchedMLP, slot: int, obs_shape: tuple[int, ...], first_action: int
) -> tuple[DiscreteNet, dict[str, Tensor]]:
    """Member ``slot`` of a discrete-SAC population (its ``encoder``, None for flat observations, and
    ``actor``): its :class:`DiscreteNet` and its tensors by name, for :func:`save_discrete_policy`."""
    named = _named_rows(encoder, actor, slot)
    sizes = [int(named["layers.0.weight"].shape[0])]
    sizes += [int(w.shape[2]) for w, _ in actor.neuron_groups()]
    if encoder is None:
        return DiscreteNet(tuple(obs_shape), tuple(sizes), first_action=first_action), named
    channels = tuple(int(w.shape[1]) for w in encoder.weights)
    features = int(encoder.linear.weight.shape[2])
    return DiscreteNet(tuple(obs_shape), tuple(sizes), channels, features, first_action), named


class DiscretePolicy:
    """A discrete-SAC actor: ``obs -> first_action + argmax(logits)``, computed by the trainer's own
    modules (:class:`agents.cnn.BatchedCNN`, :class:`agents.batched.BatchedMLP`) with one member."""

    def __init__(self, net: DiscreteNet, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        with torch.random.fork_rng(devices=[]):  # the initial weights are replaced: leave the caller's generator alone
            encoder = BatchedCNN(1, net.obs_shape, net.channels, net.features) if net.channels else None
            self.head = BatchedMLP(1, net.sizes[0], net.sizes[1:-1], net.sizes[-1])
        self.encoder = encoder
        with torch.no_grad():
            for name, row in _named_rows(encoder, self.head, 0).items():
                row.copy_(tensors[name])
        self.head.requires_grad_(False)
        if encoder is not None:
            encoder.requires_grad_(False)
        self.net, self.info = net, info
        """``info``: the export's JSON (env config and wrappers, generation, member, fitness, ...)."""

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """``obs`` ``obs_shape`` or ``(N, *obs_shape)`` -> float32 logits ``(actions,)`` or ``(N, actions)``."""
        x, single = self._batch(obs)
        with torch.inference_mode():
            out = self._logits(x).numpy()
        return out[0] if single else out

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """``obs`` ``obs_shape`` -> one action (``np.int64``); ``(N, *obs_shape)`` -> ``(N,)`` int64."""
        x, single = self._batch(obs)
        with torch.inference_mode():
            actions = self._logits(x).argmax(-1).numpy() + self.net.first_action
        return actions[0] if single else actions

    def _logits(self, x: Tensor) -> Tensor:
        """``x (N, *obs_shape)`` -> logits ``(N, actions)``, as the population's act() computes them."""
        features = x.unsqueeze(0) if self.encoder is None else self.encoder(x.unsqueeze(0))
        out: Tensor = self.head(features)[0]
        return out

    def _batch(self, obs: np.ndarray) -> tuple[Tensor, bool]:
        return observation_batch(obs, self.net.obs_shape, bool(self.net.channels))


def observation_batch(obs: np.ndarray, shape: tuple[int, ...], frames: bool) -> tuple[Tensor, bool]:
    """``obs`` (one observation of ``shape`` or ``(N, *shape)``) as a ``(N, *shape)`` tensor (uint8
    ``frames``, else float32 vectors) and whether it was one observation; ValueError (one line) for
    another shape, or frames that are not uint8."""
    x = np.asarray(obs) if frames else np.asarray(obs, np.float32)
    fits = x.ndim in (len(shape), len(shape) + 1) and x.shape[x.ndim - len(shape) :] == shape
    if not fits or (frames and x.dtype != np.uint8):
        what = "uint8 frame stacks" if frames else "observations"
        many = ", ".join(["N", *map(str, shape)])
        raise ValueError(f"expected {what} of shape {shape} or ({many}), got {x.shape} {x.dtype}")
    return torch.as_tensor(x.reshape(-1, *shape)), x.ndim == len(shape)


def save_policy(folder: Path, layers: list[tuple[Tensor, Tensor]], info: dict[str, Any]) -> list[Path]:
    """Write a TD3 actor's ``policy.safetensors`` and ``policy.json`` (``info`` plus format, tensor
    shapes and the weights file's sha256, :data:`FORMAT`) into ``folder``, each via a temporary file
    and a rename. Returns both paths."""
    tensors: dict[str, Tensor] = {}
    for i, (weight, bias) in enumerate(layers):
        tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"] = weight, bias
    return _write(folder, tensors, info, FORMAT)


def save_discrete_policy(
    folder: Path, net: DiscreteNet, tensors: dict[str, Tensor], info: dict[str, Any]
) -> list[Path]:
    """Write a discrete actor (:func:`discrete_member`'s ``net`` and ``tensors``) as :data:`FORMAT_V2`:
    ``info`` plus ``architecture`` (``net.architecture()``), tensor shapes and sha256. Returns both paths."""
    found = {name: list(t.shape) for name, t in tensors.items()}
    if found != net.tensor_shapes():
        raise ValueError(f"the tensors {found} are not the network {net}")
    return _write(folder, tensors, {"architecture": net.architecture(), **info}, FORMAT_V2)


def _write(folder: Path, tensors: dict[str, Tensor], info: dict[str, Any], fmt: str) -> list[Path]:
    """``tensors`` (floating ones as float32, others as they are) and the JSON of ``info`` in format
    ``fmt``, atomically each."""
    from safetensors.torch import save

    tensors = {name: _stored(t) for name, t in tensors.items()}
    blob = save(tensors, metadata={"format": fmt})
    described = {
        "format": fmt,
        **info,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    text = json.dumps(_finite_json(described), indent=1).encode()
    paths = [folder / WEIGHTS, folder / INFO]
    for path, data in zip(paths, (blob, text), strict=True):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return paths


def _stored(tensor: Tensor) -> Tensor:
    """``tensor`` as written: on the cpu, contiguous, float32 when floating (a generator state stays uint8)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).contiguous()


def load_policy(folder: str | Path) -> Policy | DiscretePolicy | DreamerPolicy:
    """The policy exported into ``folder`` (``python main.py export RUN --out DIR``): a :class:`Policy`
    for :data:`FORMAT`, a :class:`DiscretePolicy` for :data:`FORMAT_V2`, a stateful
    :class:`agents.dreamer_policy.DreamerPolicy` for :data:`FORMAT_V3`. Reads only JSON and
    safetensors; checks the format, the weights' sha256 and every tensor's shape.
    Raises :class:`PolicyFileError` (one line) for a missing, damaged or foreign folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    try:
        info = json.loads((folder / INFO).read_text())
        blob = (folder / WEIGHTS).read_bytes()
    except OSError as err:
        raise PolicyFileError(f"no exported policy in {folder}: {err.strerror or err}") from None
    except ValueError:
        raise PolicyFileError(f"{folder / INFO} is not valid JSON") from None
    if not isinstance(info, dict) or info.get("format") not in FORMATS:
        raise PolicyFileError(f"{folder / INFO} is not an {FORMAT} description nor an {FORMAT_V2} or {FORMAT_V3} one")
    if hashlib.sha256(blob).hexdigest() != info.get("weights_sha256"):
        raise PolicyFileError(f"{folder / WEIGHTS} does not match the sha256 in {INFO} (damaged or replaced)")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as err:
        raise PolicyFileError(f"{folder / WEIGHTS} cannot be decoded: {err}") from None
    if info["format"] == FORMAT_V2:
        return _discrete(tensors, info, folder)
    if info["format"] == FORMAT_V3:
        from agents.dreamer_policy import load_dreamer

        return load_dreamer(tensors, info, folder)
    return Policy(_layers(tensors, info, folder), *_box(info, folder), info)


def _layers(tensors: dict[str, Tensor], info: dict[str, Any], folder: Path) -> list[tuple[Tensor, Tensor]]:
    sizes = info.get("architecture", {}).get("sizes")
    expected = {}
    if isinstance(sizes, list) and len(sizes) >= 2:
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            expected[f"layers.{i}.weight"], expected[f"layers.{i}.bias"] = [a, b], [b]
    found = {name: list(t.shape) for name, t in tensors.items()}
    if not expected or found != expected:
        raise PolicyFileError(f"{folder / WEIGHTS} does not hold the MLP that {INFO} describes ({sizes})")
    return [(tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]) for i in range(len(sizes) - 1)]


def _discrete(tensors: dict[str, Tensor], info: dict[str, Any], folder: Path) -> DiscretePolicy:
    """The :data:`FORMAT_V2` policy: its architecture must be exactly the one this loader writes
    for the network it names (so every kernel, stride, activation and scaling is checked), and the
    tensors exactly that network's."""
    net = rebuilt_net(DiscreteNet, info, folder, "CNN + MLP, argmax")
    found = {name: list(t.shape) for name, t in tensors.items()}
    if found != net.tensor_shapes():
        raise PolicyFileError(f"{folder / WEIGHTS} does not hold the network that {INFO} describes")
    return DiscretePolicy(net, tensors, info)


def _box(info: dict[str, Any], folder: Path) -> tuple[np.ndarray, np.ndarray]:
    space = info.get("action_space", {})
    try:
        low, high = np.asarray(space["low"], np.float32), np.asarray(space["high"], np.float32)
    except (KeyError, TypeError, ValueError):
        raise PolicyFileError(f"{folder / INFO} has no action_space low/high") from None
    if low.shape != high.shape or low.shape != (info["architecture"]["sizes"][-1],):
        raise PolicyFileError(f"{folder / INFO}: action_space bounds do not fit the network's output")
    return low, high


def _finite_json(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def rebuilt_net(kind: Any, info: dict[str, Any], folder: Path, what: str) -> Any:
    """``kind.from_architecture(info["architecture"])``, if it writes back exactly that architecture;
    PolicyFileError (one line, naming ``what`` the loader runs) for anything else."""
    try:
        net = kind.from_architecture(info["architecture"])
        known = net.architecture() == info["architecture"]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        known = False
    if not known:
        raise PolicyFileError(f"{folder / INFO} describes no architecture this loader runs ({what})")
    return net
