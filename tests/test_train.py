import contextlib
import json
import logging
import shutil
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors.torch import load_file
from s3proxy import Fault, S3Proxy
from s3server import BUCKET, apply_env, restore_env

from sspo import storage
from sspo.run_store import RunStore, read_log
from train_tools import (RESUME, TINY, flags, kill_between_checkpoints, sspo_command, train,
                         without_timings)


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


@pytest.mark.slow
@pytest.mark.parametrize("output_kind, lora_rank, model", [("local", 0, "base_model"), ("local", 4, "base_model"),
                                                           ("s3", 0, "base_model"), ("local", 4, "sdxl_model")])
def test_killed_and_resumed_run_ends_bit_identical_and_logs_each_step_once(
        prepared, tmp_path, monkeypatch, request, output_kind, lora_rank, model):
    base_model = request.getfixturevalue(model)
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
    kill_between_checkpoints(sspo_command("train", *common), store.local / "train_log.jsonl", tmp_path,
                             lambda: store.latest_checkpoint() == store.checkpoint_url(4))
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


@contextlib.contextmanager
def through_proxy(server, fault: Fault):
    """This process's S3 requests go through a proxy in front of `server` that injects `fault`."""
    from s3fs import S3FileSystem

    proxy = S3Proxy(server.port)
    proxy.start()
    proxy.inject(fault)
    previous = apply_env({"AWS_ENDPOINT_URL": proxy.endpoint})
    S3FileSystem.clear_instance_cache()  # cached instances talk to the server directly
    try:
        yield
    finally:
        restore_env(previous)
        S3FileSystem.clear_instance_cache()
        proxy.stop()


def checkpoint_contents(output: str, step: int) -> tuple[dict, dict]:
    """(weights and optimizer tensors, training state without the run's config) of a published checkpoint."""
    url = RunStore(output).checkpoint_url(step)
    tensors = {name: load_file(storage.fetch_file(url, name)) for name in ("unet.safetensors", "optimizer.safetensors")}
    state = storage.read_json(storage.join(url, "training_state.json"))
    state.pop("config")
    return tensors, state


@pytest.mark.parametrize("output_kind", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_checkpoints_published_in_the_background_leave_the_run_bit_identical(
        base_model, prepared, tmp_path, request, caplog, output_kind):
    """The same run with async_checkpoint off and on: same log, same checkpoints. With `latest` replay each
    checkpoint is the next step's reference; on S3, slowed uploads keep it unpublished then, so replay reads its
    local copy."""
    values = {"steps": 6, "replay": "latest"}
    caplog.set_level(logging.DEBUG, logger="sspo.train.trainer")
    if output_kind == "s3":
        outputs = {mode: f"s3://{BUCKET}/background-{uuid.uuid4().hex[:8]}" for mode in (False, True)}
        with through_proxy(request.getfixturevalue("s3"), Fault("slow", "PUT", "/checkpoints/", count=10**6,
                                                                seconds=0.2)):
            summaries = {mode: train(base_model, prepared, outputs[mode], async_checkpoint=mode, **values)
                         for mode in (False, True)}
        assert "from its local copy, not yet published" in caplog.text
    else:
        outputs = {mode: str(tmp_path / f"async-{mode}") for mode in (False, True)}
        summaries = {mode: train(base_model, prepared, outputs[mode], async_checkpoint=mode, **values)
                     for mode in (False, True)}
    assert without_timings(read_log(outputs[True])) == without_timings(read_log(outputs[False]))
    for step in (2, 4, 6):
        (tensors, state), (expected_tensors, expected_state) = (checkpoint_contents(outputs[mode], step)
                                                                 for mode in (True, False))
        assert state == expected_state
        for name, expected in expected_tensors.items():
            assert tensors[name].keys() == expected.keys()
            assert all(tensors[name][key].equal(expected[key]) for key in expected), f"step {step}: {name} differs"
    # synchronous saves hold the training up for the whole write and publish
    assert summaries[False]["checkpoint_wait_seconds"] >= summaries[False]["checkpoint_publish_seconds"] > 0
    assert summaries[True]["checkpoint_publish_seconds"] > 0


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


def test_adam_kernels_train_alike_and_a_bad_one_is_one_line(base_model, prepared, tmp_path):
    """foreach and fused AdamW are the same update as torch's default up to float32 rounding."""
    weights = {}
    for kernel in ("default", "foreach", "fused"):
        output = tmp_path / kernel
        train(base_model, prepared, output, objective="sft", adam_kernel=kernel)
        weights[kernel] = load_file(storage.fetch_file(RunStore(str(output)).checkpoint_url(4), "unet.safetensors"))
    for kernel in ("foreach", "fused"):
        for name, expected in weights["default"].items():
            assert torch.allclose(weights[kernel][name], expected, rtol=1e-4, atol=1e-6), f"{kernel}: {name}"
    result = subprocess.run(sspo_command("train", "--adam-kernel", "apex", "--output", str(tmp_path / "x")),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "adam_kernel must be one of" in result.stderr
    assert "Traceback" not in result.stderr
