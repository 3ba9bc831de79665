import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sspo import config
from sspo.cli import run_train

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


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_killed_and_resumed_run_ends_bit_identical(base_model, prepared, tmp_path, lora_rank):
    train(base_model, prepared, tmp_path / "straight", lora_rank=lora_rank, **{**RESUME, "save_every": 4})
    common = flags({"model": base_model, "data": prepared, "output": tmp_path / "resumed", "lora_rank": lora_rank,
                    **RESUME})
    halfway = tmp_path / "resumed" / "checkpoints" / "step-0000004" / "manifest.json"
    process = subprocess.Popen(sspo_command("train", *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not halfway.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert halfway.exists() and not (tmp_path / "resumed" / "checkpoints" / "step-0000008").exists()

    resumed = subprocess.run(sspo_command("train", *common), capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    for name in ("step-0000004", "step-0000008"):
        straight = load_file(tmp_path / "straight" / "checkpoints" / name / "unet.safetensors")
        again = load_file(tmp_path / "resumed" / "checkpoints" / name / "unet.safetensors")
        assert straight.keys() == again.keys()
        assert all(straight[k].equal(again[k]) for k in straight), f"{name} differs after resume"


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
