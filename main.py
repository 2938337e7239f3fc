"""Command line: train a population (the default), resume a run, or list stored runs.

python main.py                         # the default preset (pendulum), local storage
python main.py --preset debug          # a few seconds
python main.py --resume                # continue the latest run in --run-dir
python main.py status                  # runs and generations stored in --run-dir
python main.py --checkpoint-uri s3://bucket/prefix   # also upload checkpoints (gs:// too)
python main.py evaluate RUN            # noise-free episodes of the newest generation's elite
python main.py export RUN --out DIR    # the elite's actor as safetensors + JSON (agents.load_policy)
python main.py plot RUN                # PNG figures of the run's logs, into its folder
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from config import DEFAULT_PRESET, PRESETS, UserError, build_config

SIGNAL_UPLOAD_WAIT_S = 20.0
"""A pre-empted pod has seconds: wait at most this long for pending uploads after SIGTERM/SIGINT."""


def _one_line_warning(message: Any, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"warning: {message}\n"


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--preset",
    default=None,
    metavar="NAME",
    help=f"Named config overlay: {', '.join(PRESETS)} (default: {DEFAULT_PRESET}).",
)
@click.option(
    "--config",
    "config_file",
    default=None,
    metavar="FILE.yaml",
    help="YAML file of config sections, applied on top of the preset.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one config key, e.g. --set agent.actor_lr=1e-3 (repeatable).",
)
@click.option(
    "--env",
    "env_id",
    default=None,
    metavar="ID",
    help="Gymnasium id (Pendulum-v1) or package.module:ClassName of your own env.",
)
@click.option("--population", type=int, default=None, metavar="N", help="Number of members.")
@click.option("--generations", type=int, default=None, metavar="N", help="Generations to run (in total).")
@click.option("--seed", type=int, default=None, help="Seed for everything (same seed, same run on CPU).")
@click.option("--device", default=None, metavar="auto|cpu|cuda", help="Where the networks run.")
@click.option(
    "--run-dir", default=None, metavar="PATH", help="Folder of runs: logs, TensorBoard and checkpoints (default: runs)."
)
@click.option(
    "--checkpoint-uri",
    default=None,
    metavar="URI",
    help="Also upload checkpoints (in the background) to gs://bucket/prefix, s3://bucket/prefix or a local path.",
)
@click.option(
    "--backend",
    default=None,
    metavar="local|ray",
    help="Where the population's rollouts run: this process (default) or Ray actors (the ray extra).",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="auto|HOST:PORT",
    help="With --backend ray: the cluster to join (default: start a local Ray instance).",
)
@click.option("--name", default=None, help="Run name (default: env, seed and time).")
@click.option(
    "--resume",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[RUN]",
    help="Continue RUN (default: the latest run in --run-dir) from its newest verified checkpoint.",
)
@click.option(
    "--allow-change",
    "allow_change",
    multiple=True,
    metavar="SECTION.KEY",
    help="With --resume: accept a change of this config key (repeatable); safe keys need no permission.",
)
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.pass_context
def cli(
    ctx: click.Context,
    preset: str | None,
    config_file: str | None,
    overrides: tuple[str, ...],
    env_id: str | None,
    population: int | None,
    generations: int | None,
    seed: int | None,
    device: str | None,
    run_dir: str | None,
    checkpoint_uri: str | None,
    backend: str | None,
    ray_address: str | None,
    name: str | None,
    resume: str | None,
    allow_change: tuple[str, ...],
    print_config: bool,
) -> None:
    """Evolve a population of actor-critic agents that learn from one shared replay buffer.

    Every generation ends with a checkpoint in the run folder; --resume continues from it.

    \b
    Dreamer member (off by default; README "Dreamer member"):
      --set dreamer.enabled=true        add a DreamerV3-style world-model member that trains
                                        from the shared replay and acts like a member; costs
                                        ~1 s per model update on 2 CPU cores (dreamer.size=tiny),
                                        env steps x dreamer.train_ratio / 1024 updates a generation
      --set dreamer.size=small|medium|large   bigger models, for a GPU
      --set dreamer.model_rollouts=true imagined transitions for the other members' micro-batches
      --set dreamer.screen=true         imagine members' fitness first; play only the promising
    """
    if ctx.invoked_subcommand is not None:
        return
    warnings.formatwarning = _one_line_warning  # type: ignore[assignment]
    extra = {
        key: value
        for key, value in {
            "env.id": env_id,
            "population": population,
            "train.generations": generations,
            "run.seed": seed,
            "run.device": device,
            "run.run_dir": run_dir,
            "run.checkpoint_uri": checkpoint_uri,
            "backend.kind": backend,
            "backend.address": ray_address,
            "run.name": name,
        }.items()
        if value is not None
    }
    with _user_errors():
        if allow_change and resume is None:
            raise UserError("--allow-change only applies with --resume")
        if resume is not None:
            if preset is not None:
                raise UserError("--preset cannot be combined with --resume: a resumed run keeps its config")
            if resume and name and resume != name:
                raise UserError(f"--resume {resume} and --name {name} name different runs")
            from training import runs  # imports torch: only after the cheap checks

            overrides_in = {"config_file": config_file, "overrides": overrides, "extra": extra}
            trainer = runs.resume(run_dir or "runs", resume or name or "", overrides_in, allow_change)
        else:
            cfg = build_config(preset or DEFAULT_PRESET, config_file, overrides, extra)
            if print_config:
                import yaml

                click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
                return
            from training import runs

            trainer = runs.start(cfg)
        from training.signals import StopRequested, stop_on_signals

        try:
            with stop_on_signals():
                record = trainer.train()
        except StopRequested as stop:
            click.echo(f"{stop}; continue with: python main.py --resume {trainer.run_name}", err=True)
            if left := trainer.finish_uploads(min(SIGNAL_UPLOAD_WAIT_S, trainer.cfg.run.upload_wait_s)):
                click.echo(f"warning: {left}", err=True)
            sys.exit(128 + stop.signum)
        except Exception as err:
            from training.memory.oom import is_out_of_memory

            if not is_out_of_memory(err):
                raise
            click.echo(trainer.out_of_memory_report(err), err=True)
            click.echo(
                f"out of memory: generation {trainer.counters.generation} is the last checkpoint; "
                "continue with: python main.py --resume",
                err=True,
            )
            sys.exit(3)
        else:
            left = trainer.finish_uploads(trainer.cfg.run.upload_wait_s)
        finally:
            trainer.close()
        click.echo(_summary(trainer, record))
        if left:
            raise UserError(left)


@cli.command()
@click.option("--run-dir", default="runs", metavar="PATH", help="Folder of runs (default: runs).")
@click.option("--checkpoint-uri", default="", metavar="URI", help="Also list the runs stored at this location.")
def status(run_dir: str, checkpoint_uri: str) -> None:
    """List the runs in --run-dir (and at --checkpoint-uri) with their checkpointed generations."""
    with _user_errors():
        from cloud.storage import redact
        from training.runs import list_runs

        found = list_runs(run_dir, checkpoint_uri)
        where = redact(checkpoint_uri)  # no user:password@ on the screen
        if not found:
            click.echo(f"no runs in {run_dir}" + (f" or {where}" if where else ""))
        for run in found:
            line = f"{run.name}  local: {_generations(run.local)}"
            if run.remote is not None:
                line += f"  {where}: {_generations(run.remote)}"
            click.echo(line)


_RUN_DIR = click.option("--run-dir", default="runs", metavar="PATH", help="Folder of runs (default: runs).")
_URI = click.option(
    "--checkpoint-uri", default="", metavar="URI", help="Also look for the run's checkpoints (and logs) there."
)
_GENERATION = click.option(
    "--generation", type=int, default=None, metavar="N", help="Generation N (1-based; default: the newest verified)."
)
_MEMBER = click.option(
    "--member", default="elite", metavar="elite|dreamer|SLOT", help="Whose policy (default: the generation's elite)."
)
_FORCE = click.option("--force", is_flag=True, help="Replace files written before.")


@cli.command()
@click.argument("run", required=False, default="")
@_RUN_DIR
@_URI
@_GENERATION
@_MEMBER
@click.option("--episodes", type=click.IntRange(min=1), default=10, show_default=True, help="Episodes to play.")
@click.option("--seed", type=int, default=0, show_default=True, help="Episode i starts from reset seed SEED + i.")
@click.option("--video", default=None, metavar="DIR", help="Record every episode there (gymnasium RecordVideo).")
@_FORCE
def evaluate(
    run: str,
    run_dir: str,
    checkpoint_uri: str,
    generation: int | None,
    member: str,
    episodes: int,
    seed: int,
    video: str | None,
    force: bool,
) -> None:
    """Play noise-free episodes of one member of RUN (default: the latest run) and print their returns."""
    with _user_errors():
        from pathlib import Path

        from training.tools import evaluate as ev
        from training.tools.output import writable_folder

        gen, chosen = _open(run, run_dir, checkpoint_uri, generation, member)
        folder = Path(video) if video is not None else None
        if folder is not None:
            files = ev.video_files(folder, ev.video_prefix(gen, chosen), episodes)
            writable_folder(folder, [f for f in files if f.exists()], force)
        result = ev.evaluate(gen, chosen, range(seed, seed + episodes), folder)
        click.echo(f"{gen.label}, {chosen.label}" + _fitness_note(chosen.fitness))
        click.echo(result.summary())
        if folder is not None:
            click.echo(f"videos: {folder}/{ev.video_prefix(gen, chosen)}-episode-*.mp4")


@cli.command()
@click.argument("run", required=False, default="")
@click.option("--out", required=True, metavar="DIR", help="Folder for policy.safetensors and policy.json.")
@_RUN_DIR
@_URI
@_GENERATION
@_MEMBER
@_FORCE
def export(
    run: str, out: str, run_dir: str, checkpoint_uri: str, generation: int | None, member: str, force: bool
) -> None:
    """Export one member's actor of RUN as safetensors + JSON; load it with agents.load_policy(DIR)."""
    with _user_errors():
        from pathlib import Path

        from training.tools.export import export as write

        gen, chosen = _open(run, run_dir, checkpoint_uri, generation, member)
        paths = write(gen, chosen, Path(out), force)
        click.echo(f"exported {chosen.label} of {gen.label}" + _fitness_note(chosen.fitness))
        click.echo("  " + "  ".join(str(p) for p in paths))


@cli.command()
@click.argument("run", required=False, default="")
@_RUN_DIR
@_URI
@_FORCE
def plot(run: str, run_dir: str, checkpoint_uri: str, force: bool) -> None:
    """Draw RUN's fitness, memory, hyperparameters and elite lineage as PNGs in its run folder."""
    with _user_errors():
        from training.tools import loading
        from training.tools.plot import plot_run

        places = loading.storages(run_dir, checkpoint_uri)
        for path in plot_run(places, run or loading.latest_run(places), force):
            click.echo(str(path))


def _open(run: str, run_dir: str, uri: str, generation: int | None, member: str) -> tuple[Any, Any]:
    """The verified generation and the chosen member (UserError in one line otherwise)."""
    from training.tools import loading

    if generation is not None and generation < 1:
        raise UserError(f"--generation counts from 1, got {generation}")
    places = loading.storages(run_dir, uri)
    index = None if generation is None else generation - 1
    gen = loading.open_generation(places, run or loading.latest_run(places), index)
    return gen, loading.choose_member(gen, member)


def _fitness_note(fitness: float | None) -> str:
    return "" if fitness is None else f" (fitness {fitness:.2f} in training)"


def _generations(found: list[int]) -> str:
    """Newest-first generation numbers (0-based) as the 1-based ones people count."""
    if not found:
        return "no checkpoint"
    return f"generations {', '.join(str(g + 1) for g in reversed(found))}"


def _summary(trainer: Any, record: dict[str, Any]) -> str:
    c = trainer.counters
    if not record:
        return f"nothing to do: run {trainer.run_name!r} already finished {c.generation} generations"
    return (
        f"done: {c.generation} generations, {c.env_steps:,} env steps, {c.updates:,} optimizer steps "
        f"in {c.elapsed_s / 60:.1f} min\n"
        f"last generation's fitness: best {record['fitness_best']:.1f}, median {record['fitness_median']:.1f} "
        f"(mean return of {trainer.cfg.train.eval_episodes} noise-free episode(s) per member; the best of "
        f"{trainer.population} members is an optimistic estimate of the elite's return)\n"
        f"run folder: {trainer.log.path.parent}  "
        f"(continue with: python main.py --resume {trainer.run_name} --generations {c.generation * 2})"
    )


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn user-facing errors into one line on stderr and exit code 2; Ctrl-C into exit 130."""
    try:
        yield
    except UserError as err:
        from cloud.storage import redact  # no user:password@ of a URL in any message

        click.echo(f"error: {redact(str(err))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(
            "\ninterrupted: the last finished generation is checkpointed; continue with: python main.py --resume",
            err=True,
        )
        sys.exit(130)


if __name__ == "__main__":
    cli()
