"""PNG figures of a run's logs (``metrics.jsonl``, ``lineage.jsonl``), drawn headless (Agg).

Each ``*_figure`` function takes the parsed records and returns a matplotlib ``Figure`` whose
lines carry a ``gid`` naming what they show; :func:`plotted` reads the drawn arrays back, so
tests compare what was drawn with the log."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cloud.storage import LocalStorage, Storage
from config import EvolutionConfig, MemoryConfig, UserError, from_dict
from training.memory.sentinel import theil_sen
from training.tools.loading import parse_jsonl
from training.tools.output import writable_folder

FIGURES = ("fitness.png", "memory.png", "hyperparameters.png", "lineage.png")
MEMORY_SERIES = ("rss_mb", "uss_mb", "replay_filled_mb", "cuda_allocated_mb", "cuda_reserved_mb")
DPI = 80


def plot_run(places: list[Storage], run: str, force: bool = False) -> list[Path]:
    """Write :data:`FIGURES` into the run's folder (``places[0]``, the local run folder) from its
    logs there, or from a remote copy's ``logs/``. Refuses to replace earlier figures without ``force``."""
    local = places[0]
    assert isinstance(local, LocalStorage)
    records, events = read_logs(places, run)
    folder = local.root / run
    writable_folder(folder, [folder / name for name in FIGURES if (folder / name).exists()], force)
    memory = _memory_config(folder)
    figures = {
        "fitness.png": fitness_figure(records),
        "memory.png": memory_figure(records, memory),
        "hyperparameters.png": hyperparameter_figure(records),
        "lineage.png": lineage_figure(records, events),
    }
    paths = []
    for name, figure in figures.items():
        path = folder / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}.png")
        try:
            tmp.write_bytes(png_bytes(figure))
            os.replace(tmp, path)
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror or err}") from None
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    return paths


def png_bytes(figure: Figure) -> bytes:
    """The figure as a small PNG: drawn at :data:`DPI`, then reduced to a 128-colour palette."""
    from PIL import Image

    drawn = io.BytesIO()
    figure.savefig(drawn, format="png", dpi=DPI)
    out = io.BytesIO()
    Image.open(drawn).convert("RGB").quantize(colors=128).save(out, format="png", optimize=True)
    return out.getvalue()


def read_logs(places: list[Storage], run: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics records by generation, lineage events) from the run folder, else a remote copy."""
    candidates = [(places[0], f"{run}/"), *((s, f"{run}/logs/") for s in places[1:])]
    for storage, prefix in candidates:
        if storage.exists(prefix + "metrics.jsonl"):
            records = parse_jsonl(storage.read(prefix + "metrics.jsonl"))
            lineage = prefix + "lineage.jsonl"
            events = parse_jsonl(storage.read(lineage)) if storage.exists(lineage) else []
            records = [r for r in records if isinstance(r.get("generation"), int)]
            if records:
                by_generation = {r["generation"]: r for r in records}  # a rerun generation's last record counts
                return [by_generation[g] for g in sorted(by_generation)], events
    where = " or ".join(s.url(run) for s in places)
    raise UserError(f"no metrics log of run {run!r} in {where}")


def _memory_config(folder: Path) -> MemoryConfig:
    """The run's leak-sentinel settings (its ``config.yaml``), else the defaults."""
    import yaml

    try:
        return from_dict(yaml.safe_load((folder / "config.yaml").read_text())).memory
    except (OSError, yaml.YAMLError, UserError, TypeError, AttributeError):
        return MemoryConfig()


def _series(records: list[dict[str, Any]], key: str) -> np.ndarray:
    """``records[i][key]`` as floats, NaN where absent or not finite (a gap in the line)."""
    values = np.array([float(r.get(key, np.nan)) for r in records], np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


def _members(records: list[dict[str, Any]], key: str) -> np.ndarray:
    """Per-member values ``(generations, P)`` of ``members[key]``, NaN where absent or not finite."""
    width = max(len(r.get("members", {}).get(key, [])) for r in records)
    out = np.full((len(records), width), np.nan)
    for i, r in enumerate(records):
        row = np.asarray(r.get("members", {}).get(key, []), np.float64)
        out[i, : len(row)] = row
    out[~np.isfinite(out)] = np.nan
    return out


def fitness_figure(records: list[dict[str, Any]]) -> Figure:
    """Fitness per generation against total env steps: best, median, worst, each member faint."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    steps = _series(records, "env_steps_total")
    members = _members(records, "fitness")
    for slot in range(members.shape[1]):
        ax.plot(steps, members[:, slot], color="0.8", lw=0.7, gid=f"member {slot}")
    for key, label, style in (
        ("fitness_best", "best", "C0-"),
        ("fitness_median", "median", "C1-"),
        ("fitness_worst", "worst", "C3-"),
    ):
        ax.plot(steps, _series(records, key), style, lw=1.8, marker=".", label=label, gid=label)
    if any("dreamer_fitness" in r for r in records):
        ax.plot(steps, _series(records, "dreamer_fitness"), "C2--", label="Dreamer member", gid="dreamer")
    ax.set(xlabel="env steps (all members, warm-up included)", ylabel="fitness (mean noise-free return)")
    ax.set_title(f"fitness per generation ({records[-1].get('env_id', '')}, P={members.shape[1]}; grey: each slot)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def memory_figure(records: list[dict[str, Any]], memory: MemoryConfig | None = None) -> Figure:
    """Memory per generation (RSS, USS, replay filled, CUDA allocated/reserved when logged) and the
    leak sentinel's Theil-Sen line over its latest window of ``RSS - replay filled``."""
    memory = memory or MemoryConfig()
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    generation = _series(records, "generation") + 1
    for key in MEMORY_SERIES:
        if any(key in r for r in records):
            ax.plot(generation, _series(records, key), marker=".", label=key.removesuffix("_mb"), gid=key)
    net = _series(records, "rss_mb") - np.nan_to_num(_series(records, "replay_filled_mb"))
    ax.plot(generation, net, "k:", label="rss - replay filled (watched)", gid="rss_net")
    x, y = generation[memory.leak_warmup :][-memory.leak_window :], net[memory.leak_warmup :][-memory.leak_window :]
    keep = np.isfinite(y)
    if keep.sum() >= 3:
        slope, intercept = theil_sen(x[keep], y[keep])
        short = "" if keep.sum() >= memory.leak_window else f", {keep.sum()} < window {memory.leak_window}"
        ax.plot(x, slope * x + intercept, "r-", lw=2, label=f"sentinel fit {slope:+.2f} MB/gen{short}", gid="fit")
    ax.set(xlabel="generation", ylabel="MB")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("memory per generation (leak sentinel: rss net of the replay fill)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize="small")
    fig.tight_layout()
    return fig


def hyperparameters_of(records: list[dict[str, Any]]) -> list[str]:
    """Per-member hyperparameters in the log (those evolution has bounds for), in log order."""
    bounded = {f.name for f in dataclasses.fields(EvolutionConfig)}
    return [name for name in records[-1].get("members", {}) if f"{name}_bounds" in bounded]


def hyperparameter_figure(records: list[dict[str, Any]]) -> Figure:
    """Each per-member hyperparameter over generations: every slot faint, the elite's value bold."""
    names = hyperparameters_of(records) or ["(none logged)"]
    rows = -(-len(names) // 2)
    fig = Figure(figsize=(9, 1.8 * rows + 0.7))
    axes = fig.subplots(rows, 2, sharex=True, squeeze=False).ravel()
    generation = _series(records, "generation") + 1
    elite = np.array([int(r.get("elite_slot", 0)) for r in records])
    for ax, name in zip(axes, names, strict=False):
        values = _members(records, name)
        for slot in range(values.shape[1]):
            ax.plot(generation, values[:, slot], color="0.78", lw=0.7, gid=f"{name} member {slot}")
        if values.shape[1]:
            chosen = values[np.arange(len(records)), np.minimum(elite, values.shape[1] - 1)]
            ax.plot(generation, chosen, "C0-", marker=".", lw=1.8, label="elite", gid=f"{name} elite")
        if name.endswith("_lr") or name == "tau":
            ax.set_yscale("log")
        ax.set_title(name, fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    for ax in axes[-2:]:
        ax.set_xlabel("generation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("per-member hyperparameters after each generation's evolution (grey: each slot; blue: the elite)")
    fig.tight_layout()
    return fig


def elite_lineage(records: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last generation's elite and its ancestors, newest first, from the lineage events: each
    ``{"id", "born", "parent", "parent_fitness", "change"}`` (``born`` the 1-based generation after
    which it was made; None for an initial member)."""
    born = {int(e["id"]): e for e in events if "id" in e}
    last = records[-1]
    lineage = str(last.get("elite_lineage", ""))
    member = int(lineage.split(" <- ")[0]) if lineage else int(last.get("elite_slot", 0))
    chain: list[dict[str, Any]] = []
    while member is not None and len(chain) <= len(born):
        event = born.get(member)
        chain.append(
            {
                "id": member,
                "born": None if event is None else int(event["generation"]) + 1,
                "parent": None if event is None else int(event["parent"]),
                "parent_fitness": None if event is None else float(event["parent_fitness"]),
                "change": None if event is None else event.get("hyperparameters"),
            }
        )
        member = chain[-1]["parent"]
    return chain


def lineage_figure(records: list[dict[str, Any]], events: list[dict[str, Any]]) -> Figure:
    """The elite's lineage on the best-fitness curve: each ancestor at the generation it was made,
    at its parent's fitness then, labelled with its id and how its hyperparameters changed."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    generation = _series(records, "generation") + 1
    ax.plot(generation, _series(records, "fitness_best"), "0.6", lw=1.2, label="best fitness", gid="best")
    full = elite_lineage(records, events)
    chain = [c for c in full if c["born"] is not None][::-1]
    xs = np.array([c["born"] for c in chain], np.float64)
    ys = np.array([c["parent_fitness"] for c in chain], np.float64)
    ax.plot(xs, ys, "C3o-", label="elite's ancestors (at birth: parent's fitness)", gid="lineage")
    for i, (c, x, y) in enumerate(zip(chain, xs, ys, strict=True)):
        offset = (4, 6) if i % 2 == 0 else (4, -12)  # alternate, so neighbours' labels do not overlap
        ax.annotate(f"{c['id']} ({c['change']})", (x, y), textcoords="offset points", xytext=offset, fontsize=7)
    root = full[-1]["id"]
    last = records[-1]
    ax.set_title(
        f"elite of generation {last['generation'] + 1}: id {full[0]['id']} "
        f"(slot {last.get('elite_slot')}), descended from initial member {root}"
    )
    ax.set(xlabel="generation", ylabel="fitness")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def plotted(fig: Figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every line drawn in ``fig`` with a gid: gid -> (x, y) as float arrays."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                out[str(line.get_gid())] = (
                    np.asarray(line.get_xdata(), np.float64),
                    np.asarray(line.get_ydata(), np.float64),
                )
    return out
