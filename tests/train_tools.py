"""Running `sspo train` in tests: tiny settings, the command line, interrupting a run, comparing logs."""

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from sspo import config
from sspo.stages import run_train

TINY = {"steps": 4, "batch_size": 4, "save_every": 2, "sample_steps": 2, "lr_warmup_steps": 1}
RESUME = {**TINY, "steps": 8, "save_every": 4, "lr_schedule": "cosine", "lr_warmup_steps": 2}


def train(base_model, prepared, output, **overrides):
    values = {"model": base_model, "data": prepared, "output": str(output), **TINY, **overrides}
    return run_train(config.load("train", None, values))


def sspo_command(*args):
    return [sys.executable, "-m", "sspo.cli", *args]


def flags(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def without_timings(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if not key.endswith("seconds")} for row in rows]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process it started (a launcher's workers may run in sessions of their own)."""
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        process.send_signal(signal.SIGKILL)


def kill_between_checkpoints(command: list[str], log_file: Path, cwd: Path, published: Callable[[], bool]) -> None:
    """Start `command` and SIGKILL it once step 5 is logged and `published()` says checkpoint 4 is (it is published
    in the background): before checkpoint 8."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if log_file.exists() and log_file.read_text().count("\n") >= 5 and published():
            break
        time.sleep(0.02)
    kill_tree(process.pid)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be interrupted"
