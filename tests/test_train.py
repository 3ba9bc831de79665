import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file
from s3server import BUCKET

from sspo import config, storage
from sspo.run_store import RunStore, read_log
from sspo.stages import run_train

TINY = {"steps": 4, "batch_size": 4, "save_every": 2, "sample_steps": 2, "lr_warmup_steps": 1}


def train(base_model, prepared, output, **overrides):
    values = {"model": base_model, "data": prepared, "output": str(output), **TINY, **overrides}
    return run_train(config.load("train", None, values))


@pytest.mark.parametrize("objective", ["sspo", "spin", "sft"])
def test_objectives_train_and_publish_checkpoints(base_model, prepared, tmp_path, objective):
    summary = train(base_model, prepared, tmp_path / "run", objective=objective)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000004"]
    for name in checkpoints:
        assert (tmp_path / "run" / "checkpoints" / name / "manifest.json").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert summary["final_step"] == 4
    expected = {"sspo": {"ssr_rate", "implicit_acc", "ref_index"}, "spin": {"implicit_acc", "ref_index"}, "sft": set()}
    assert expected[objective] <= set(log[0])


def sspo_command(*args):
    return [sys.executable, "-m", "sspo.cli", *args]


def flags(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]


RESUME = {**TINY, "steps": 8, "save_every": 4, "lr_schedule": "cosine", "lr_warmup_steps": 2}


def without_timings(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def kill_between_checkpoints(command: list[str], log_file: Path, cwd: Path) -> None:
    """Start `command` and SIGKILL it once step 5 is logged: after checkpoint 4 was published, before 8."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if log_file.exists() and log_file.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be interrupted"


@pytest.mark.slow
@pytest.mark.parametrize("output_kind, lora_rank", [("local", 0), ("local", 4), ("s3", 0)])
def test_killed_and_resumed_run_ends_bit_identical_and_logs_each_step_once(
        base_model, prepared, tmp_path, monkeypatch, request, output_kind, lora_rank):
    train(base_model, prepared, tmp_path / "straight", lora_rank=lora_rank, **RESUME)
    if output_kind == "s3":
        server = request.getfixturevalue("s3")
        output = f"s3://{BUCKET}/runs-{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv("SSPO_CACHE", str(tmp_path / "cache"))  # this run's cache only, inherited by its processes
        server.ensure_bucket()
    else:
        output = str(tmp_path / "resumed")
    store = RunStore(output)
    common = flags({"model": base_model, "data": prepared, "output": output, "lora_rank": lora_rank, **RESUME})
    kill_between_checkpoints(sspo_command("train", *common), store.local / "train_log.jsonl", tmp_path)
    assert store.latest_checkpoint() == store.checkpoint_url(4)
    if output_kind == "s3":
        shutil.rmtree(store.local)  # a retried pod starts with an empty local folder

    resumed = subprocess.run(sspo_command("train", *common), capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert without_timings(read_log(output)) == without_timings(read_log(str(tmp_path / "straight")))
    for step in (4, 8):
        straight = load_file(tmp_path / "straight" / "checkpoints" / f"step-{step:07d}" / "unet.safetensors")
        again = load_file(storage.fetch_file(store.checkpoint_url(step), "unet.safetensors"))
        assert straight.keys() == again.keys()
        assert all(straight[k].equal(again[k]) for k in straight), f"step {step} differs after resume"
    if output_kind == "s3":
        # published checkpoints leave no staging behind, and replay fetched weights files only
        assert not (store.local / "checkpoints").exists() or not any((store.local / "checkpoints").iterdir())
        assert not list((tmp_path / "cache").rglob("optimizer.safetensors"))
        assert list((tmp_path / "cache" / "files").iterdir()), "the replayed checkpoint's weights were not fetched"


@pytest.mark.slow
def test_two_process_cpu_run(base_model, prepared, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "sspo.cli", "train",
               *flags({"model": base_model, "data": prepared, "output": tmp_path / "ddp", **TINY})]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert (tmp_path / "ddp" / "checkpoints" / "step-0000004" / "manifest.json").exists()


def test_bad_objective_is_one_clear_error(base_model, prepared, tmp_path):
    result = subprocess.run(sspo_command("train", "--objective", "ppo", "--output", str(tmp_path / "x")),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "objective must be one of" in result.stderr and "Traceback" not in result.stderr


def test_dpo_needs_paired_data(base_model, prepared, tmp_path):
    result = subprocess.run(sspo_command("train", *flags({"model": base_model, "data": prepared, "objective": "dpo",
                                                          "output": tmp_path / "dpo"})),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "--keep-pairs" in result.stderr and "Traceback" not in result.stderr
