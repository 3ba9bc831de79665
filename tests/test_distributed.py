"""The trainer on several processes and nodes, as torchrun starts it on a cluster (Kubeflow Trainer runs torchrun in
every node's pod): two simulated nodes on localhost with gloo, a resume on another number of processes, a lost peer,
and a run that was asked for a GPU on a machine without one."""

import json
import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from failure_tools import assert_one_line_error
from s3server import free_port
from sspo.run_store import RunStore, read_log
from train_tools import TINY, flags, kill_between_checkpoints, kill_tree, sspo_command, train

# Summed gradients of two processes (all-reduce) and of two accumulated micro-batches agree up to float32 rounding
# in the order of additions: ~1e-7 relative per step, far below any change a step makes.
WEIGHT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def node_command(node_rank: int, nodes: int, port: int, *train_args: str) -> list[str]:
    """torchrun for one of `nodes` simulated nodes of one process each, meeting on localhost."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "sspo.cli", "train", *train_args]


def standalone_command(processes: int, *train_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "sspo.cli", "train", *train_args]


def run_nodes(commands: list[list[str]], cwd, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for command in commands]
    outputs = [p.communicate(timeout=timeout) for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(processes, outputs)]


@pytest.mark.slow
def test_two_nodes_train_like_one_process_with_twice_the_accumulation(base_model, prepared, tmp_path):
    values = {"model": base_model, "data": prepared, **TINY, "threads": 1}
    port = free_port()
    nodes = run_nodes([node_command(rank, 2, port, *flags({**values, "output": tmp_path / "nodes"}))
                       for rank in (0, 1)], tmp_path)
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    train(base_model, prepared, tmp_path / "single", gradient_accumulation_steps=2)

    two, one = read_log(str(tmp_path / "nodes")), read_log(str(tmp_path / "single"))
    assert [row["samples"] for row in two] == [row["samples"] for row in one]  # the same samples every step
    assert [row["loss"] for row in two] == pytest.approx([row["loss"] for row in one], rel=1e-4)
    config = json.loads((tmp_path / "nodes" / "config.json").read_text())
    assert (config["processes"], config["effective_batch"]) == (2, 2 * TINY["batch_size"])
    summary = json.loads((tmp_path / "nodes" / "metrics.json").read_text())
    assert (summary["processes"], summary["effective_batch"]) == (2, 2 * TINY["batch_size"])

    final = f"checkpoints/step-{TINY['steps']:07d}/unet.safetensors"
    nodes_weights, single_weights = load_file(tmp_path / "nodes" / final), load_file(tmp_path / "single" / final)
    base_weights = load_file(os.path.join(base_model, "unet", "diffusion_pytorch_model.safetensors"))
    assert nodes_weights.keys() == single_weights.keys()
    changed = 0
    for name, weight in nodes_weights.items():
        assert weight.allclose(single_weights[name], **WEIGHT_TOLERANCE), name
        changed += not weight.equal(base_weights[name])
    assert changed > len(nodes_weights) // 2, "training changed too few weights for the comparison to mean much"


@pytest.mark.slow
def test_a_run_resumed_on_one_process_continues_the_sample_order_of_two(base_model, prepared, tmp_path):
    values = {"model": base_model, "data": prepared, **TINY, "steps": 8, "save_every": 4, "threads": 1}
    output = tmp_path / "resumed"
    store = RunStore(str(output))
    kill_between_checkpoints(standalone_command(2, *flags({**values, "output": output})), output / "train_log.jsonl",
                             tmp_path, lambda: store.latest_checkpoint() == store.checkpoint_url(4))
    resumed = subprocess.run(sspo_command("train", *flags({**values, "output": output,
                                                           "gradient_accumulation_steps": 2})),
                             capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    straight_values = {key: value for key, value in values.items() if key != "threads"}
    train(base_model, prepared, tmp_path / "straight", **straight_values, gradient_accumulation_steps=2)

    log, straight = read_log(str(output)), read_log(str(tmp_path / "straight"))
    assert [row["step"] for row in log] == list(range(1, 9))
    assert [row["samples"] for row in log] == [row["samples"] for row in straight]
    assert len({row["samples"] for row in log}) == 8


def test_another_effective_batch_is_refused_on_resume(base_model, prepared, tmp_path):
    train(base_model, prepared, tmp_path / "run", steps=2)
    result = subprocess.run(sspo_command("train", *flags({"model": base_model, "data": prepared, **TINY,
                                                          "output": tmp_path / "run", "steps": 4,
                                                          "gradient_accumulation_steps": 2})),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "train", "effective batch", "4 → 8")


def test_a_resume_may_split_the_same_effective_batch_differently(base_model, prepared, tmp_path):
    train(base_model, prepared, tmp_path / "run", steps=2)
    train(base_model, prepared, tmp_path / "run", steps=4, batch_size=2, gradient_accumulation_steps=2)
    assert [row["step"] for row in read_log(str(tmp_path / "run"))] == [1, 2, 3, 4]


@pytest.mark.slow
def test_every_process_says_where_it_was_when_a_peer_is_lost(base_model, prepared, tmp_path):
    values = {"model": base_model, "data": prepared, **TINY, "steps": 1000, "save_every": 1000, "threads": 1,
              "collective_timeout": 30, "output": tmp_path / "lost"}
    port = free_port()
    survivor = subprocess.Popen(node_command(0, 2, port, *flags(values)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lost = subprocess.Popen(node_command(1, 2, port, *flags(values)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    log_file = tmp_path / "lost" / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log_file.exists() and log_file.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_tree(lost.pid)  # the node vanishes: its launcher and its training process at once
    lost.wait()
    killed_at = time.monotonic()
    _, stderr = survivor.communicate(timeout=values["collective_timeout"] + 120)
    assert survivor.returncode != 0
    assert time.monotonic() - killed_at < values["collective_timeout"] + 60
    assert "process 0 of 2 stopped at step" in stderr, stderr[-3000:]


def test_asked_for_cuda_without_a_gpu_the_run_does_not_start(base_model, prepared, tmp_path):
    result = subprocess.run(sspo_command("train", *flags({"model": base_model, "data": prepared, **TINY,
                                                          "device": "cuda", "output": tmp_path / "run"})),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "train", "device cuda was asked for")
    assert not (tmp_path / "run").exists()


def test_logs_name_the_samples_of_each_step(base_model, prepared, tmp_path):
    """The digest of the samples each step trained on: a resumed or rescaled run can be checked against it."""
    train(base_model, prepared, tmp_path / "a", steps=3)
    train(base_model, prepared, tmp_path / "b", steps=3, seed=1)
    a, b = read_log(str(tmp_path / "a")), read_log(str(tmp_path / "b"))
    assert len({row["samples"] for row in a}) == 3
    assert [row["samples"] for row in a] != [row["samples"] for row in b]
    assert all(row["data_seconds"] >= 0 for row in a)
