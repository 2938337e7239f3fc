"""An exported actor: a safetensors file of its weights plus a small JSON, and the loader that
turns them into a plain callable ``obs -> action`` (numpy in, numpy out).

```
DIR/policy.safetensors   layers.<i>.weight (in, out) and layers.<i>.bias (out,), float32
DIR/policy.json          format, architecture, spaces, action scaling, where it came from
```

Loading reads JSON and safetensors only (no pickle): it never executes code from the files. The
loaded policy needs no trainer, replay or cloud client::

    from agents import load_policy
    policy = load_policy("exported/")
    action = policy(obs)            # obs (obs_dim,) -> action (act_dim,), in the env's units
    actions = policy(batch)         # (N, obs_dim) -> (N, act_dim)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agents.batched import BatchedMLP

FORMAT = "evorl-policy/1"
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


def save_policy(folder: Path, layers: list[tuple[Tensor, Tensor]], info: dict[str, Any]) -> list[Path]:
    """Write ``policy.safetensors`` and ``policy.json`` (``info`` plus format, tensor shapes and the
    weights file's sha256) into ``folder``, each via a temporary file and a rename. Returns both paths."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    for i, (weight, bias) in enumerate(layers):
        tensors[f"layers.{i}.weight"] = weight.detach().cpu().float().contiguous()
        tensors[f"layers.{i}.bias"] = bias.detach().cpu().float().contiguous()
    blob = save(tensors, metadata={"format": FORMAT})
    described = {
        "format": FORMAT,
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


def load_policy(folder: str | Path) -> Policy:
    """The policy exported into ``folder`` (``python main.py export RUN --out DIR``). Reads only JSON
    and safetensors; checks the format, the weights' sha256 and every tensor's shape.
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
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise PolicyFileError(f"{folder / INFO} is not an {FORMAT} description")
    if hashlib.sha256(blob).hexdigest() != info.get("weights_sha256"):
        raise PolicyFileError(f"{folder / WEIGHTS} does not match the sha256 in {INFO} (damaged or replaced)")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as err:
        raise PolicyFileError(f"{folder / WEIGHTS} cannot be decoded: {err}") from None
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
