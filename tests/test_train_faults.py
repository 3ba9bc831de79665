"""Training never uses a damaged or misplaced checkpoint, never publishes NaN weights, and refuses a resume that would
change the run: each failure is one line on stderr and exit code 2."""

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from failure_tools import assert_one_line_error, needs_root, sspo_on_full_disk
from s3proxy import Fault, S3Proxy
from s3server import BUCKET
from safetensors.torch import load_file

from sspo import storage
from sspo.run_store import RunStore, read_log

TINY = {"batch_size": 4, "sample_steps": 2, "save_every": 2, "lr_warmup_steps": 1}


def sspo_train(cwd: Path, **values) -> subprocess.CompletedProcess:
    flags = [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    return subprocess.run([sys.executable, "-m", "sspo", "train", "--params", "", *flags], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("sspo train: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


def flip_bytes(path: Path, offset: int = 4096, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_replay_checkpoint_is_refused_not_trained_on(base_model, prepared, tmp_path):
    run = {"model": base_model, "data": prepared, "output": "runs/p1", **TINY}
    assert sspo_train(tmp_path, steps=8, **run).returncode == 0
    for step in (2, 4, 6):  # every older pool entry: whichever the replay draws is damaged
        flip_bytes(tmp_path / "runs/p1/checkpoints" / f"step-{step:07d}" / "unet.safetensors")
    error = one_line_error(sspo_train(tmp_path, steps=12, **run))
    assert "unet.safetensors does not match its sha256" in error
    assert RunStore(str(tmp_path / "runs/p1")).latest_checkpoint().endswith("step-0000008")


@pytest.mark.slow
def test_a_moved_run_resumes_from_its_own_checkpoints(base_model, prepared, tmp_path):
    run = {"model": base_model, "data": prepared, **TINY}
    assert sspo_train(tmp_path, steps=4, output="runs/a", **run).returncode == 0
    state = json.loads((tmp_path / "runs/a/checkpoints/step-0000004/training_state.json").read_text())
    assert state["pool"] == ["base", "checkpoints/step-0000002", "checkpoints/step-0000004"]
    assert Path(state["config"]["model"]).is_absolute() and Path(state["config"]["data"]).is_absolute()

    shutil.copytree(tmp_path / "runs/a", tmp_path / "elsewhere" / "copy")
    shutil.rmtree(tmp_path / "runs")  # the copy must not need the original
    elsewhere = tmp_path / "elsewhere"
    resumed = sspo_train(elsewhere, steps=8, output="copy", **run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = [json.loads(line) for line in (elsewhere / "copy" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 9))
    assert {row["ref_index"] for row in log[4:]} - {0}, "no step replayed one of the run's own checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize("save_every, what", [(2, "has a loss of nan"), (1, "holds NaN or inf values")])
def test_a_diverging_run_stops_in_one_line_and_publishes_no_broken_weights(base_model, prepared, tmp_path,
                                                                           save_every, what):
    result = sspo_train(tmp_path, model=base_model, data=prepared, output="runs/inf", steps=3,
                        **{**TINY, "save_every": save_every, "learning_rate": "inf", "lr_warmup_steps": 0})
    error = one_line_error(result)
    assert "training stopped" in error and what in error
    for checkpoint in (tmp_path / "runs/inf/checkpoints").glob("step-*"):
        if (checkpoint / "manifest.json").exists():
            weights = load_file(checkpoint / "unet.safetensors")
            assert all(tensor.isfinite().all() for tensor in weights.values()), f"{checkpoint.name} was published"
    assert not (tmp_path / "runs/inf/metrics.json").exists()


@pytest.mark.slow
def test_a_resume_refuses_settings_that_change_the_run(base_model, prepared, tmp_path):
    run = {"model": base_model, "data": prepared, "output": "runs/l1", **TINY, "lora_rank": 4}
    assert sspo_train(tmp_path, steps=2, **run).returncode == 0
    config_before = (tmp_path / "runs/l1/config.json").read_text()

    error = one_line_error(sspo_train(tmp_path, steps=4, **{**run, "lora_alpha": 64, "objective": "sft", "seed": 7,
                                                           "learning_rate": 0.5}))
    for setting in ("lora_alpha", "objective", "seed", "learning_rate"):
        assert setting in error
    error = one_line_error(sspo_train(tmp_path, steps=4, **{**run, "lora_rank": 8}))
    assert "lora_rank 4 → 8" in error
    assert (tmp_path / "runs/l1/config.json").read_text() == config_before
    assert RunStore(str(tmp_path / "runs/l1")).latest_checkpoint().endswith("step-0000002")

    resumed = sspo_train(tmp_path, steps=4, **{**run, "save_every": 4, "replay_cache_size": 3})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert RunStore(str(tmp_path / "runs/l1")).latest_checkpoint().endswith("step-0000004")


@pytest.mark.slow
def test_a_failed_background_upload_stops_the_run_in_one_line_and_keeps_what_was_published(
        base_model, prepared, s3, tmp_path, monkeypatch):
    output = f"s3://{BUCKET}/refused-{uuid.uuid4().hex[:8]}"
    run = {"model": base_model, "data": prepared, "output": output, **TINY, "steps": 6}
    proxy = S3Proxy(s3.port)
    proxy.start()
    proxy.inject(Fault("error", "PUT", "/checkpoints/step-0000004/", count=10**6))  # beyond every retry
    try:
        with monkeypatch.context() as patch:
            patch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            error = one_line_error(sspo_train(tmp_path, **run))
    finally:
        proxy.stop()
    store = RunStore(output)
    assert f"checkpoint {store.checkpoint_url(4)} could not be written or published" in error
    assert f"the last published checkpoint is {store.checkpoint_url(2)}" in error
    assert store.latest_checkpoint() == store.checkpoint_url(2)  # and nothing after it: the run stopped
    assert not storage.is_published(store.checkpoint_url(6))
    storage.download_dir(store.checkpoint_url(2), tmp_path / "intact", require_manifest=True)  # checks each sha256

    shutil.rmtree(store.local)  # as a retried pod
    resumed = sspo_train(tmp_path, **run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {output} at step 2" in resumed.stderr
    assert [row["step"] for row in read_log(output)] == list(range(1, 7))
    assert store.latest_checkpoint() == store.checkpoint_url(6)


@needs_root
def test_a_full_disk_stops_training_in_one_line_and_publishes_no_checkpoint(base_model, prepared, tmp_path):
    disk = tmp_path / "disk"
    result, left = sspo_on_full_disk(disk, "1m", "train", "--params", "", "--model", base_model, "--data", prepared,
                                     "--output", str(disk / "run"), "--steps", "2", "--save-every", "1",
                                     "--batch-size", "2", "--sample-steps", "1", "--lr-warmup-steps", "0")
    assert_one_line_error(result.stderr, "train", "No space left on device")
    assert result.returncode == 2
    assert not [path for path in left if path.endswith("manifest.json")], left
