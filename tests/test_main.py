"""The command line. The cases a user meets first run as the user runs them (``python main.py ...``
in a subprocess); further error cases run in-process through click's test runner, which is faster."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import click
import pytest
import torch
import yaml
from click.testing import CliRunner, Result

from config import build_config
from main import cli
from training import runs

RunCli = Callable[..., CompletedProcess[str]]


def tiny_args(run_dir: Path | str, *more: str) -> list[str]:
    return [
        "--preset",
        "debug",
        "--generations",
        "1",
        "--run-dir",
        str(run_dir),
        "--set",
        "run.tensorboard=false",
        *more,
    ]


def assert_one_line_user_error(result: CompletedProcess[str] | Result, *expected: str) -> None:
    code = result.returncode if isinstance(result, CompletedProcess) else result.exit_code
    assert code == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]


# ---------------------------------------------------------------- help and success


def test_help_lists_every_option(run_cli: RunCli) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    options = [opt for param in cli.params if isinstance(param, click.Option) for opt in param.opts]
    assert len(options) >= 12
    missing = [opt for opt in options if opt not in result.stdout]
    assert not missing
    assert "status" in result.stdout


def test_debug_preset_finishes_and_prints_status(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli(*tiny_args(tmp_path / "runs", "--name", "smoke"))
    assert result.returncode == 0, result.stderr
    assert "System Status" in result.stdout
    assert "done: 1 generations" in result.stdout
    assert "Traceback" not in result.stderr
    assert (tmp_path / "runs" / "smoke" / "gen-000000" / "MANIFEST.json").is_file()


def test_resume_continues_the_latest_run(run_cli: RunCli, tmp_path: Path, tiny_config) -> None:
    trainer = runs.start(tiny_config({"train.generations": 1, "run.name": "first"}))
    trainer.train()
    trainer.close()
    result = run_cli("--resume", "--run-dir", str(tmp_path / "runs"), "--generations", "2")
    assert result.returncode == 0, result.stderr
    assert "resuming run 'first' after generation 1" in result.stdout
    assert "generation 2/2" in result.stdout
    assert "done: 2 generations" in result.stdout


def test_custom_env_class_trains(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli(*tiny_args(tmp_path / "runs", "--env", "custom_envs.toy:CounterEnv"))
    assert result.returncode == 0, result.stderr
    assert "System Status" in result.stdout
    assert "custom_envs.toy:CounterEnv" in result.stdout


def test_print_config_prints_the_resolved_yaml(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, tiny_args(tmp_path / "runs", "--set", "agent.actor_lr=1e-3", "--print-config"))
    assert result.exit_code == 0, result.output
    tree = yaml.safe_load(result.stdout)
    assert tree["agent"]["actor_lr"] == pytest.approx(1e-3)
    assert tree["train"]["generations"] == 1
    assert not (tmp_path / "runs").exists()


def test_status_lists_runs_and_their_generations(run_cli: RunCli, tiny_config, tmp_path: Path) -> None:
    trainer = runs.start(tiny_config({"train.generations": 2, "run.name": "listed"}))
    trainer.train()
    trainer.close()
    result = run_cli("status", "--run-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["listed", "local:", "generations", "1,", "2"]


def test_status_of_an_empty_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["status", "--run-dir", str(tmp_path / "none")])
    assert result.exit_code == 0
    assert "no runs in" in result.stdout


# ---------------------------------------------------------------- user errors: exit 2, one line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "nope"], ["unknown preset 'nope'"]),
        (["--set", "agent.nope=1"], ["agent.nope"]),
        (["--set", "agent.gamma=1.5"], ["agent.gamma"]),
        (["--env", "NoSuchEnv-v0"], ["NoSuchEnv-v0"]),
        (["--env", "custom_envs.toy:MultiDiscreteEnv"], ["action space"]),
        (["--env", "custom_envs.toy:DictObsEnv"], ["observation space"]),
        (["--population", "2", "--set", "evolution.elites=3"], ["population (2)", "evolution.elites (3)"]),
    ],
    ids=[
        "unknown-preset",
        "unknown-key",
        "out-of-range",
        "unknown-env",
        "multi-discrete-actions",
        "dict-observations",
        "population-not-above-elites",
    ],
)
def test_bad_input_is_one_error_line_with_exit_code_2(
    run_cli: RunCli, tmp_path: Path, args: list[str], expected: list[str]
) -> None:
    assert_one_line_user_error(run_cli(*tiny_args(tmp_path / "runs", *args)), *expected)


def test_wrong_type_is_one_error_line(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli("--preset", "debug", "--run-dir", str(tmp_path / "runs"), "--set", "train.generations=abc")
    assert_one_line_user_error(result, "train.generations must be of type int")


def test_population_smaller_than_elites_is_refused(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli(*tiny_args(tmp_path / "runs", "--population", "1", "--set", "evolution.elites=2"))
    assert_one_line_user_error(result, "evolution.elites")


def test_run_dir_under_a_regular_file_is_refused(run_cli: RunCli, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli(*tiny_args(blocker / "runs"))
    assert_one_line_user_error(result, "cannot write to", str(blocker))


def test_resume_with_nothing_to_resume(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli("--resume", "--run-dir", str(tmp_path / "empty"))
    assert_one_line_user_error(result, "nothing to resume")


# ---------------------------------------------------------------- more user errors, in-process


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "nosuch.key=1"], ["nosuch"]),
        (["--env", "custom_envs.toy:NoSuchClass"], ["NoSuchClass"]),
        (["--env", "custom_envs.toy:NotAnEnv"], ["not a gymnasium.Env"]),
        (["--env", "custom_envs.toy:UnboundedActionEnv"], ["unbounded actions"]),
        (["--env", "no_such_module:Env"], ["no_such_module"]),
        (["--set", "agent.algorithm=nope"], ["agent.algorithm"]),
        (["--env", "custom_envs.toy:BrokenConstructorEnv"], ["cannot construct", "simulator license not found"]),
        (["--env", "custom_envs.toy:NaNEnv"], ["non-finite observation", "NaNEnv"]),
    ],
)
def test_more_bad_input_in_process(custom_envs: str, tmp_path: Path, args: list[str], expected: list[str]) -> None:
    assert_one_line_user_error(invoke(*tiny_args(tmp_path / "runs", *args)), *expected)


def test_missing_config_file(tmp_path: Path) -> None:
    result = invoke(*tiny_args(tmp_path / "runs", "--config", str(tmp_path / "missing.yaml")))
    assert_one_line_user_error(result, "cannot read config file")


def test_resume_of_an_unknown_run_name(tmp_path: Path) -> None:
    assert_one_line_user_error(invoke("--resume", "--run-dir", str(tmp_path / "empty"), "--name", "ghost"), "ghost")


def test_resume_refuses_a_preset(tmp_path: Path) -> None:
    result = invoke("--resume", "--preset", "debug", "--run-dir", str(tmp_path / "runs"))
    assert_one_line_user_error(result, "--preset cannot be combined with --resume")


def test_resume_refuses_a_changed_config(tmp_path: Path, tiny_config) -> None:
    trainer = runs.start(tiny_config({"train.generations": 1, "run.name": "fixed"}))
    trainer.train()
    trainer.close()
    result = invoke("--resume", "--run-dir", str(tmp_path / "runs"), "--set", "agent.actor_lr=0.001")
    assert_one_line_user_error(result, "cannot resume run 'fixed'", "agent.actor_lr")


def test_existing_run_name_is_not_overwritten(tmp_path: Path, tiny_config) -> None:
    runs.start(tiny_config({"run.name": "taken"})).close()
    result = invoke(*tiny_args(tmp_path / "runs", "--name", "taken"))
    assert_one_line_user_error(result, "run 'taken' already exists")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path: Path) -> None:
    assert_one_line_user_error(invoke(*tiny_args(tmp_path / "runs", "--device", "cuda")), "CUDA is not available")


def test_bad_env_leaves_no_run_folder_behind(tmp_path: Path) -> None:
    result = invoke(*tiny_args(tmp_path / "runs", "--env", "NoSuchEnv-v0"))
    assert_one_line_user_error(result, "NoSuchEnv-v0")
    assert not any((tmp_path / "runs").rglob("*.yaml"))


def test_file_uri_run_dir_keeps_logs_and_checkpoints_together(tmp_path: Path) -> None:
    result = invoke(*tiny_args(f"file://{tmp_path}/runs", "--name", "uri"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "uri"
    assert (run / "metrics.jsonl").is_file() and (run / "run.json").is_file()
    assert any(run.glob("gen-*/MANIFEST.json"))


def test_numeric_run_name_from_set_is_a_string(tmp_path: Path) -> None:
    assert build_config("debug", overrides=["run.name=123"]).run.name == "123"


def test_a_failed_checkpoint_write_is_one_error_line_and_leaves_no_partial_file(tmp_path: Path) -> None:
    """A real OS write failure (a file-size limit, as a full disk would be), not a mock."""
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    run_dir = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "main.py", *tiny_args(run_dir)],
        cwd=Path(__file__).resolve().parents[1],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert_one_line_user_error(result, "checkpoint of generation 1 not written", "File too large")
    assert not list(run_dir.rglob("*.tmp-*"))
    assert not list(run_dir.rglob("MANIFEST.json"))


# ---------------------------------------------------------------- resume by name, allowed changes


def _finished_run(tiny_config, name: str, generations: int = 1) -> None:
    trainer = runs.start(tiny_config({"train.generations": generations, "run.name": name}))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    trainer.close()


def test_resume_names_the_run_to_continue(tmp_path: Path, tiny_config) -> None:
    _finished_run(tiny_config, "older")
    _finished_run(tiny_config, "newer")
    result = invoke("--resume", "older", "--run-dir", str(tmp_path / "runs"), "--generations", "2")
    assert result.exit_code == 0, result.output
    assert "resuming run 'older' after generation 1" in result.output
    assert (tmp_path / "runs" / "older" / "gen-000001" / "MANIFEST.json").is_file()
    assert not (tmp_path / "runs" / "newer" / "gen-000001").exists()


def test_resume_and_name_must_agree(tmp_path: Path) -> None:
    result = invoke("--resume", "a", "--name", "b", "--run-dir", str(tmp_path / "runs"))
    assert_one_line_user_error(result, "--resume a and --name b name different runs")


def test_allow_change_needs_resume(tmp_path: Path) -> None:
    result = invoke(*tiny_args(tmp_path / "runs", "--allow-change", "agent.actor_lr"))
    assert_one_line_user_error(result, "--allow-change only applies with --resume")


def test_an_allowed_change_is_kept_by_later_resumes(tmp_path: Path, tiny_config) -> None:
    _finished_run(tiny_config, "tuned")
    run_dir = str(tmp_path / "runs")
    changed = ["--resume", "tuned", "--run-dir", run_dir, "--set", "agent.actor_lr=0.002"]
    assert_one_line_user_error(invoke(*changed, "--generations", "2"), "agent.actor_lr", "--allow-change")
    result = invoke(*changed, "--generations", "2", "--allow-change", "agent.actor_lr")
    assert result.exit_code == 0, result.output
    again = invoke("--resume", "tuned", "--run-dir", run_dir, "--generations", "3")
    assert again.exit_code == 0, again.output
    saved = json.loads((tmp_path / "runs" / "tuned" / "gen-000002" / "state.json").read_text())
    assert saved["config"]["agent"]["actor_lr"] == 0.002


def test_an_allowed_change_of_shapes_is_refused_clearly(tmp_path: Path, tiny_config) -> None:
    _finished_run(tiny_config, "shaped")
    args = ["--resume", "shaped", "--run-dir", str(tmp_path / "runs"), "--set", "agent.hidden_sizes=[16,16]"]
    result = invoke(*args, "--allow-change", "agent.hidden_sizes")
    assert_one_line_user_error(result, "does not fit the changed config")


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://bucket/runs"])
def test_a_cloud_run_dir_is_refused_pointing_to_checkpoint_uri(tmp_path: Path, uri: str) -> None:
    assert_one_line_user_error(invoke(*tiny_args(uri)), "--run-dir must be a local folder", "--checkpoint-uri")
    assert_one_line_user_error(invoke("status", "--run-dir", uri), "--run-dir must be a local folder")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("ftp://host/runs", "run.checkpoint_uri must be a local path, s3://bucket/prefix or gs://bucket/prefix"),
        ("s3://", "names no bucket"),
        ("gs:///runs", "has no bucket name"),
    ],
)
def test_a_bad_checkpoint_uri_is_one_error_line(tmp_path: Path, uri: str, expected: str) -> None:
    assert_one_line_user_error(invoke(*tiny_args(tmp_path / "runs", "--checkpoint-uri", uri)), expected)
    assert not list((tmp_path / "runs").glob("*/gen-*"))


def test_missing_aws_credentials_fail_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cloud.s3_server import isolate_aws_env

    isolate_aws_env(monkeypatch, str(tmp_path))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached: no credentials to sign with
    result = invoke(*tiny_args(tmp_path / "runs", "--checkpoint-uri", "s3://bucket/runs"))
    assert_one_line_user_error(result, "no AWS credentials found")
    assert not list((tmp_path / "runs").glob("*/gen-*"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: state.pop("counters"),  # a key missing
        lambda state: state.update(counters=[1, 2]),  # a value of the wrong type
        lambda state: state.update(rng_python="x"),  # a value that does not unpack
    ],
)
def test_a_vouched_for_state_of_the_wrong_structure_is_refused_in_one_line(
    tmp_path: Path, tiny_config, damage: Callable[[dict], object]
) -> None:
    """A manifest that vouches for valid JSON of the wrong structure (a bug, or a hand-edited run):
    one line, exit 2, and the generation is still there afterwards."""
    import hashlib

    trainer = runs.start(tiny_config({"train.generations": 1, "run.name": "odd"}))
    trainer.train()
    trainer.close()
    generation = tmp_path / "runs" / "odd" / "gen-000000"
    state = json.loads((generation / "state.json").read_text())
    damage(state)
    data = json.dumps(state).encode()
    (generation / "state.json").write_bytes(data)
    manifest = json.loads((generation / "MANIFEST.json").read_text())
    manifest["objects"]["state.json"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (generation / "MANIFEST.json").write_text(json.dumps(manifest))
    result = invoke("--resume", "--run-dir", str(tmp_path / "runs"))
    assert_one_line_user_error(result, "generation 1 of run 'odd'", "cannot be read")
    assert (generation / "MANIFEST.json").is_file() and (generation / "state.json").read_bytes() == data
