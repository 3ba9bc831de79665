"""The DVC pipeline in a real git + DVC repository with an S3 remote on a real (moto) server, and dvc:// URLs."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from s3server import BUCKET

from sspo import config, storage
from sspo.stages import run_train

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("data/world", "models/base", "data/prepared", "runs/sspo", "runs/registered.json", "eval/sspo",
           "models/exported")
TINY_PARAMS = {
    "world": {"samples_per_scene": 2},
    "bootstrap": {"vae_steps": 20, "vae_batch_size": 8, "unet_steps": 20, "unet_batch_size": 8},
    "train": {"steps": 2, "batch_size": 2, "save_every": 1, "sample_steps": 2, "lr_warmup_steps": 1},
    "evaluate": {"seeds": [0], "sample_steps": 2, "bootstrap_samples": 10},
    "experiment": {"arms": ["sft", "sspo"], "seeds": [0], "steps": 2, "batch_size": 2, "eval_seeds": [0],
                   "eval_sample_steps": 2},
}


def run(repo: Path, *command: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def dvc_repo(s3, tmp_path):
    """A git repository with the project's dvc.yaml files, tiny params and an S3 remote on the test server."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo)
    (repo / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "dvc.yaml", repo / "experiments")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage, values in TINY_PARAMS.items():
        params[stage].update(values)
    params["register"]["registry"] = str(tmp_path / "registry")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.com")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    run(repo, "dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/dvc-{uuid.uuid4().hex[:8]}")
    run(repo, "dvc", "remote", "modify", "store", "endpointurl", s3.endpoint)
    return repo


def wipe(repo: Path) -> None:
    shutil.rmtree(repo / ".dvc" / "cache")
    for output in OUTPUTS:
        path = repo / output
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow
def test_repro_push_pull_and_replay_from_a_dvc_path(dvc_repo, tmp_path):
    repo = dvc_repo
    run(repo, "dvc", "repro")
    for output in OUTPUTS:
        assert (repo / output).exists(), output
    record = json.loads((repo / "runs" / "registered.json").read_text())
    assert record["version"] == "1" and record["alias"] == "candidate"
    assert (repo / "eval" / "sspo" / "table.md").read_text().startswith("| model |")
    card = (repo / "models" / "exported" / "README.md").read_text()
    assert "version: '1'" in card and "samples/grid-heldout.png" in card
    metrics = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    assert "runs/sspo/metrics.json" in json.dumps(metrics)
    plots = json.loads(run(repo, "dvc", "plots", "show", "--json"))
    assert not plots.get("errors") and plots["data"]["loss"] and plots["data"]["ssr-rate"]

    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "toy pipeline")
    commit = run(repo, "git", "rev-parse", "HEAD").strip()
    run(repo, "dvc", "push")
    wipe(repo)
    run(repo, "dvc", "pull")
    for output in ("data/world", "models/base", "data/prepared", "eval/sspo", "models/exported"):
        storage.verify_dir(repo / output)
    assert "up to date" in run(repo, "dvc", "status", "dvc.yaml").lower()

    # a checkpoint of that commit as a replay pool entry, read through DVC from the S3 remote
    wipe(repo)
    checkpoint = storage.dvc_url("runs/sspo/checkpoints/step-0000002", str(repo), commit)
    base = storage.dvc_url("models/base", str(repo), commit)
    data = storage.dvc_url("data/prepared", str(repo), commit)
    tiny = {"steps": 1, "batch_size": 2, "sample_steps": 2, "save_every": 5, "replay": "latest"}
    run_train(config.load("train", None, {"model": base, "data": data, "output": str(tmp_path / "run"),
                                          "replay_from": checkpoint, **tiny}))
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000001" / "training_state.json").read_text())
    assert state["pool"] == ["base", checkpoint]


@pytest.mark.slow
def test_experiment_grid_is_its_own_dvc_pipeline_one_stage_per_cell(dvc_repo):
    repo = dvc_repo
    first = run(repo, "dvc", "repro", "experiments/dvc.yaml")
    for stage in ("world", "bootstrap", "prepare", "experiments/dvc.yaml:cell@sft-0",
                  "experiments/dvc.yaml:cell@sspo-0", "experiments/dvc.yaml:results"):
        assert f"Running stage '{stage}'" in first
    assert "Running stage 'train'" not in first
    root = run(repo, "dvc", "repro")
    assert "Running stage 'evaluate'" in root and "experiments/dvc.yaml" not in root
    table = (repo / "experiments" / "toy" / "results.md").read_text()
    assert "| sft | 1 |" in table and "| sspo | 1 |" in table

    # One more seed: only its cells and the table run again; the table then counts two seeds per arm.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["experiment"]["seeds"] = [0, 1]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    second = run(repo, "dvc", "repro", "experiments/dvc.yaml")
    assert [line for line in second.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'experiments/dvc.yaml:cell@sft-1':",
        "Running stage 'experiments/dvc.yaml:cell@sspo-1':",
        "Running stage 'experiments/dvc.yaml:results':",
    ]
    table = (repo / "experiments" / "toy" / "results.md").read_text()
    assert "| sft | 2 |" in table and "| sspo | 2 |" in table
    assert "up to date" in run(repo, "dvc", "status", "experiments/dvc.yaml").lower()
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json", "experiments/toy/metrics.json"))
    metrics = shown[""]["data"]["experiments/toy/metrics.json"]["data"]
    summary = json.loads((repo / "experiments" / "toy" / "results.json").read_text())["summary"]
    assert metrics["sspo"]["seeds"] == 2
    assert [metrics["sspo"]["heldout_score"], metrics["sspo"]["heldout_score_ci"]] == summary["sspo"]["heldout_score"]
