"""The fault campaign as figures: `make faults` (or `python bench/faults.py [--quick] [--seed N] [--keep DIR]`).

Each part drives the real `sspo` command against real files, real processes and a real S3 server (moto) and checks
what the issue asks of it; the command prints one table and exits 1 if any case failed.

(a) kill -9 at the fault points of a training run (sspo.faults), then resume: the final weights are bit-identical
    to an uninterrupted run's and train_log.jsonl holds each step exactly once; no half checkpoint is ever visible.
(b) the S3 server stopped, slowed, answering 5xx, resetting connections, losing replies or cutting downloads (a
    loopback proxy in front of moto) while `sspo register` and a training run publish, `sspo registry pull` reads
    and `sspo train --replay-from` replays: retried and correct; an outage longer than the retries ends in one line,
    leaves no partial version visible, and the rerun succeeds. The cache never holds a file that fails its sha256.
(c) generated bad inputs (seeded) to `sspo prepare`, `evaluate`, `register` and `pipeline submit`, run in-process
    through sspo.cli.main: each ends with a non-zero exit and one line on stderr, no traceback and nothing
    published, or - for odd but valid input such as a CMYK or EXIF-rotated image - is accepted and converted.
(d) a NaN loss (fault hook): a clean stop in one line, exit 2, the last good checkpoint intact, no NaN published.
(e) a corrupt replay pool entry (local, on S3, or the run's own latest checkpoint): refused in one line, exit 2.
(f) no pickle loads anywhere in sspo/ (the scan of tests/test_package.py).

Training runs are processes forked from a fork server that has the libraries loaded (a fresh `python -m sspo`
spends most of its time importing); kill -9 lands on them through the fault hook, SSPO_FAULT.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sspo import storage
from sspo.faults import ENV as FAULT_ENV
from sspo.run_store import RunStore, is_finished, read_log

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3proxy import Fault, S3Proxy  # noqa: E402
from s3server import AWS_ENV, BUCKET, S3Server, apply_env, free_port, restore_env  # noqa: E402

# The training run every kill, retry and NaN case repeats: two checkpoints (steps 2 and 4), tiny and fast.
TRAIN = {"steps": 4, "batch_size": 2, "save_every": 2, "sample_steps": 2, "lr_warmup_steps": 1}
REPLAY = {"steps": 2, "batch_size": 2, "save_every": 10, "sample_steps": 2, "lr_warmup_steps": 1, "replay": "latest"}
# Enough attempts for the short outages of part (b); the outage cases lower it to fail fast.
RETRIES = {"SSPO_STORAGE_ATTEMPTS": "5", "SSPO_STORAGE_RETRY_DELAY": "0.2"}
OUTAGE_RETRIES = {"SSPO_STORAGE_ATTEMPTS": "2", "SSPO_STORAGE_RETRY_DELAY": "0.05"}

REFUSED = "refused in one line"
USAGE = "refused by the argument parser (usage, then one line)"
CONVERTED = "accepted and converted"
SKIPPED = "accepted, the bad sample skipped and counted"
ACCEPTED = "accepted"

LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")
PROGRESS_BAR = re.compile(r".*\d+%\|.*\|")
ERROR_LINE = re.compile(r"sspo( [a-z -]+)?: error: ")


# -- cases and their verdicts


class CaseFailed(Exception):
    def __init__(self, why: str, detail: str = ""):
        super().__init__(why)
        self.why, self.detail = why, detail


def expect(condition, why: str, detail: str = "") -> None:
    if not condition:
        raise CaseFailed(why, detail)


@dataclass
class Case:
    part: str
    name: str
    outcome: str = ""
    failure: str = ""  # why the case failed; "" when it passed
    detail: str = ""  # its input and output, for a failed case


def run_case(results: list[Case], part: str, name: str, action: Callable[[], str]) -> None:
    case = Case(part, name)
    try:
        case.outcome = action()
    except CaseFailed as failed:
        case.failure, case.detail = failed.why, failed.detail
    except Exception:  # the campaign's own error, not the product's: report it as a failed case, keep going
        case.failure, case.detail = "the campaign itself raised", traceback.format_exc()
    results.append(case)


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def refusal(stderr: str) -> str:
    """REFUSED or USAGE when stderr ends in exactly one error line and holds nothing but log records, progress
    and (for USAGE) argparse's usage text besides; CaseFailed otherwise."""
    expect("Traceback" not in stderr, "traceback on stderr", tail(stderr, 30))
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    expect(len(errors) == 1 and lines[-1] == errors[0], "not exactly one error line at the end of stderr", tail(stderr))
    usage = lines[0].startswith("usage: ")
    others = [line for line in lines[:-1] if not (LOG_RECORD.match(line) or PROGRESS_BAR.match(line)
                                                   or (usage and (line.startswith(("usage: ", " ")))))]
    expect(not others, "stray lines on stderr besides the error line", tail(stderr))
    return USAGE if usage else REFUSED


# -- running sspo: forked processes, or in this process


@dataclass
class Finished:
    code: int | None  # exit code; -9 when killed by SIGKILL; None when it ran out of time
    stderr: str

    def error_line(self) -> str:
        return next((line for line in reversed(self.stderr.splitlines()) if ERROR_LINE.match(line)), "")


def sspo_child(argv: list[str], cwd: str, env: dict, log_stem: str) -> None:
    """A process forked from the fork server: `sspo ARGV` in `cwd` with `env` added, output in LOG_STEM.out/.err."""
    for descriptor, suffix in ((1, ".out"), (2, ".err")):
        os.dup2(os.open(log_stem + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), descriptor)
    os.environ.update(env)
    os.chdir(cwd)
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # a killed process cannot release a multiprocessing lock: it would "leak"
    from sspo.cli import main

    sys.exit(main(argv))


class StderrOfTheMoment(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, so records land in the stderr a case captures."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def capture_logs_per_case() -> logging.Handler:
    """Root handler for in-process cases (sspo.cli.main's basicConfig then leaves logging alone)."""
    handler = StderrOfTheMoment()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def sspo_here(argv: list[str], cwd: Path) -> tuple[Finished, str]:
    """`sspo ARGV` through sspo.cli.main in this process, in the folder `cwd` (where relative paths land): (what
    it did, the traceback of an exception that escaped main(), or "")."""
    from sspo.cli import main

    err, escaped = io.StringIO(), ""
    previous = os.getcwd()
    os.chdir(cwd)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:
            code, escaped = None, traceback.format_exc()
        finally:
            os.chdir(previous)
    return Finished(code, err.getvalue()), escaped


def flags(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def without_timings(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if not key.endswith("seconds")} for row in rows]


class Lab:
    """What the cases share: a scratch folder, the toy base model and data, an uninterrupted reference run, the S3
    server behind its fault proxy, and a fork server that starts `sspo` processes with the libraries loaded."""

    def __init__(self, work: Path, base: str, data: str, s3: S3Server):
        self.work, self.base, self.data, self.s3 = work, base, data, s3
        self.proxy = S3Proxy(s3.port)
        self.proxy.start()
        self.cache = work / "cache"
        self.processes = multiprocessing.get_context("forkserver")
        entry = "__main__" if sspo_child.__module__ == "__main__" else sspo_child.__module__
        self.processes.set_forkserver_preload([entry, "sspo.cli", "sspo.train.trainer"])
        self.straight = ""
        self.counter = 0
        self._registry = ""

    def env(self, **extra: str) -> dict:
        """The environment of every case: AWS variables pointing at the proxy, the cache, the retry budget."""
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.proxy.endpoint, "SSPO_CACHE": str(self.cache), **RETRIES,
                **extra}

    @contextlib.contextmanager
    def environment(self):
        previous = apply_env(self.env())
        try:
            yield
        finally:
            restore_env(previous)

    def folder(self, kind: str) -> Path:
        self.counter += 1
        path = self.work / kind / f"{self.counter:05d}"
        path.mkdir(parents=True)
        return path

    def s3_url(self, kind: str) -> str:
        return f"s3://{BUCKET}/{kind}-{uuid.uuid4().hex[:8]}"

    def sspo(self, argv: list[str], cwd: Path, **env: str) -> Finished:
        """`sspo ARGV` as a forked process with the campaign's environment plus `env` (killed after 10 minutes)."""
        stem = str(cwd / f"sspo-{uuid.uuid4().hex[:6]}")
        process = self.processes.Process(target=sspo_child, args=(argv, str(cwd), self.env(**env), stem))
        process.start()
        process.join(600)
        if process.is_alive():
            process.kill()
            process.join()
            code = None
        else:
            code = process.exitcode
        return Finished(code, Path(stem + ".err").read_text())

    def registry_with_a_version(self) -> str:
        """An S3 registry holding the reference run's last checkpoint as toy version 1 (alias candidate), made once."""
        if not self._registry:
            from sspo import config, registry

            root = self.s3_url("registry")
            registry.register(config.load("register", None, {"registry": root, "name": "toy",
                                                              "checkpoint": self.straight, "data": self.data}))
            self._registry = root
        return self._registry

    def train_argv(self, output: str, **values) -> list[str]:
        return ["train", "--params", "", *flags({"model": self.base, "data": self.data, "output": output,
                                                  **TRAIN, **values})]

    def make_straight_run(self) -> None:
        folder = self.folder("straight")
        output = str(folder / "run")
        finished = self.sspo(self.train_argv(output), folder)
        if finished.code != 0:
            raise RuntimeError(f"the uninterrupted reference run failed:\n{tail(finished.stderr, 30)}")
        self.straight = output

    # -- what a run left behind

    def published_checkpoints(self, run: str) -> list[str]:
        """Names of the run's checkpoints that have a manifest, each checked file by file against it."""
        url = storage.join(run, "checkpoints")
        fs, path = storage.filesystem(url)
        fs.invalidate_cache()
        if not fs.exists(path):
            return []
        names = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
        published = [name for name in names if storage.is_published(storage.join(url, name))]
        for name in published:
            checkpoint = storage.join(url, name)
            try:
                if storage.is_local(checkpoint):
                    storage.verify_dir(storage.local_path(checkpoint))
                else:
                    copy = storage.download_dir(checkpoint, self.work / "verify" / uuid.uuid4().hex,
                                                require_manifest=True)
                    shutil.rmtree(copy)
            except storage.SSPOError as err:
                raise CaseFailed(f"a published checkpoint does not match its manifest: {err}") from None
        return published

    def weights(self, checkpoint: str) -> dict:
        from safetensors.torch import load_file

        if storage.is_local(checkpoint):
            return load_file(storage.local_path(checkpoint) / "unet.safetensors")
        return load_file(storage.fetch_file(checkpoint, "unet.safetensors"))

    def same_weights(self, checkpoint: str, reference: str) -> bool:
        mine, theirs = self.weights(checkpoint), self.weights(reference)
        return mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)

    def check_matches_straight(self, run: str) -> None:
        """The run finished, logged each step once, and its checkpoints equal the uninterrupted run's bit for bit."""
        rows, reference = without_timings(read_log(run)), without_timings(read_log(self.straight))
        steps = [row["step"] for row in rows]
        expect(steps == [row["step"] for row in reference], f"train_log.jsonl steps are {steps}")
        expect(rows == reference, "train_log.jsonl rows differ from the uninterrupted run's")
        names = self.published_checkpoints(run)
        expect(names == self.published_checkpoints(self.straight), f"published checkpoints are {names}")
        for name in names:
            expect(self.same_weights(storage.join(run, "checkpoints", name),
                                     storage.join(self.straight, "checkpoints", name)),
                   f"{name} differs from the uninterrupted run's")
        expect(is_finished(run), "the run has no metrics.json: it did not finish")

    def corrupt_cache_files(self, cache: Path | None = None) -> list[str]:
        """Files the cache would trust that fail their sha256: downloaded files named by their sha256, and
        fetched folders with a manifest."""
        cache = cache or self.cache
        broken = [str(p) for p in (cache / "files").glob("*")
                  if not p.name.startswith(".") and storage.sha256_file(p) != p.name]
        for folder in (cache / "fetched").glob("*"):
            if (folder / storage.MANIFEST).exists():
                try:
                    storage.verify_dir(folder)
                except storage.SSPOError:
                    broken.append(str(folder))
        return broken


# -- (a) kill -9 at each fault point, then resume


@dataclass
class Kill:
    output: str  # "local" or "s3"
    fault: str  # SSPO_FAULT
    window: str
    torn_log: bool = False  # cut the last log line in half after the kill (a crash in the middle of the append)
    fresh_pod: bool = True  # an S3 run resumes with an empty local folder, as a retried pod does


KILLS = [
    Kill("local", "train-step-done:3", "mid-step: step 3's update done, not logged"),
    Kill("local", "train-step-logged:3", "after step 3 was logged"),
    Kill("local", "checkpoint-weights-written:1", "mid-checkpoint-write: weights written, optimizer not"),
    Kill("local", "checkpoint-written:2", "checkpoint 4 staged, nothing published"),
    Kill("local", "run-files-synced:2", "run files synced, checkpoint 4 not published"),
    Kill("local", "publish-manifest-next:1", "between checkpoint 2's files and its manifest"),
    Kill("local", "checkpoint-published:2", "after the last manifest, before metrics.json"),
    Kill("local", "train-step-logged:3", "mid-log-append: step 3's line torn in half", torn_log=True),
    Kill("s3", "publish-file-uploaded:1", "mid-publish: 1 of checkpoint 2's 4 files uploaded"),
    Kill("s3", "publish-file-uploaded:7", "mid-publish: 3 of checkpoint 4's 4 files uploaded"),
    Kill("s3", "publish-manifest-next:2", "between checkpoint 4's files and its manifest"),
    Kill("s3", "checkpoint-published:1", "after checkpoint 2's manifest, before the next run-file sync"),
    Kill("s3", "run-files-synced:2", "run files uploaded, checkpoint 4 not published"),
    Kill("s3", "train-step-logged:3", "step 3 logged locally only; the same pod restarts", fresh_pod=False),
]
QUICK_KILLS = [0, 5, 8, 10]


def kill_and_resume(lab: Lab, kill: Kill) -> str:
    folder = lab.folder("kill")
    output = str(folder / "run") if kill.output == "local" else lab.s3_url("kill")
    killed = lab.sspo(lab.train_argv(output), folder, **{FAULT_ENV: kill.fault})
    expect(killed.code == -9, f"not killed at {kill.fault} (exit {killed.code})", tail(killed.stderr))
    lab.published_checkpoints(output)  # none half-published
    store = RunStore(output)
    if kill.torn_log:
        log = store.local / "train_log.jsonl"
        text = log.read_text()
        last = text.rstrip("\n").rsplit("\n", 1)[-1]
        log.write_text(text[: len(text) - len(last) - 1] + last[: len(last) // 2])
    if kill.output == "s3" and kill.fresh_pod:
        shutil.rmtree(store.local)
    resumed = lab.sspo(lab.train_argv(output), folder)
    expect(resumed.code == 0, f"the resume failed (exit {resumed.code}): {resumed.error_line()}", tail(resumed.stderr))
    lab.check_matches_straight(output)
    return "resumed bit-identical, each step logged once"


def part_kills(lab: Lab, results: list[Case], chosen: list[int]) -> None:
    for index in chosen:
        kill = KILLS[index]
        run_case(results, "(a) kill -9 in a training run, then resume", f"{kill.output} {kill.fault}: {kill.window}",
                 lambda: kill_and_resume(lab, kill))


# -- (b) a faulty S3 server under publish, pull and replay


PUT_FAULTS = [("stopped 0.8 s", Fault("stop", "PUT", seconds=0.8)),
              ("slowed 0.3 s a request", Fault("slow", "PUT", count=4, seconds=0.3)),
              ("5xx answers", Fault("error", "PUT", count=2)),
              ("connection resets", Fault("reset", "PUT", count=2)),
              ("reply lost after the write", Fault("lose-reply", "PUT", count=2))]
GET_FAULTS = [("stopped 0.8 s", Fault("stop", "GET", seconds=0.8)),
              ("slowed 0.3 s a request", Fault("slow", "GET", count=4, seconds=0.3)),
              ("5xx answers", Fault("error", "GET", count=2)),
              ("connection resets", Fault("reset", "GET", count=2)),
              ("download cut mid-body", Fault("cut-body", "GET", count=2))]
OUTAGE = "stopped beyond the retries"


def fresh(template: Fault, path: str, skip: int) -> Fault:
    """A new fault like `template` on requests whose path holds `path`, after `skip` of them went through."""
    return Fault(template.kind, template.method, path, skip, template.count, template.seconds)


class S3Operation:
    """One storage operation under test: `run` does it (faults on), `check` that its result is right."""

    name = ""
    method = "PUT"
    path = ""  # the requests the faults hit
    skip = 1  # matching requests let through first, so that the fault lands mid-operation
    cache: Path | None = None  # the cache it fills (None: the campaign's)

    def __init__(self, lab: Lab):
        self.lab = lab

    def prepare(self) -> None:
        """Set up a fresh target for one case (faults off)."""

    def run(self, **env: str) -> Finished:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def check_nothing_partial(self) -> None:
        """After a failed attempt: nothing half-made is visible."""
        raise NotImplementedError

    def attempt(self, template: Fault, outage: bool) -> str:
        lab = self.lab
        self.prepare()
        fault = lab.proxy.inject(fresh(template, self.path, self.skip))
        try:
            finished = self.run(**(OUTAGE_RETRIES if outage else {}))
        finally:
            lab.proxy.clear()
        expect(fault.injected, f"the fault never triggered ({fault.matched} matching requests)")
        broken = lab.corrupt_cache_files(self.cache)
        expect(not broken, f"corrupt files in the cache: {broken}")
        if not outage:
            expect(finished.code == 0, f"failed (exit {finished.code}): {finished.error_line()}", tail(finished.stderr))
            self.check()
            return f"retried, succeeded ({fault.injected} faults injected)"
        expect(finished.code == 2, f"exit {finished.code} after the retries ran out", tail(finished.stderr))
        refusal(finished.stderr)
        self.check_nothing_partial()
        rerun = self.run()
        expect(rerun.code == 0, f"the rerun failed (exit {rerun.code}): {rerun.error_line()}", tail(rerun.stderr))
        self.check()
        return "gave up in one line, nothing partial visible, the rerun succeeded"


class Register(S3Operation):
    name = "sspo register to an S3 registry"
    path = "/versions/"

    def prepare(self):
        self.root = self.lab.s3_url("registry")

    def run(self, **env):
        with apply_env_temporarily(env):
            finished, escaped = sspo_here(["register", "--params", "", "--registry", self.root, "--name", "toy",
                                           "--checkpoint", self.lab.straight, "--data", self.lab.data],
                                          self.lab.work)
        expect(not escaped, "traceback: an exception escaped main()", escaped)
        return finished

    def check(self):
        from sspo import registry

        versions = registry.list_versions(self.root, "toy")
        expect(len(versions) == 1, f"published versions: {versions}")
        url = registry.version_url(self.root, "toy", versions[0])
        copy = storage.download_dir(url, self.lab.work / "verify" / uuid.uuid4().hex, require_manifest=True)
        expect(self.lab.same_weights(str(copy), storage.join(self.lab.straight, "checkpoints", "step-0000004")),
               "the registered weights differ from the checkpoint's")
        expect(registry.list_aliases(self.root, "toy") == {"candidate": versions[0]}, "the alias is not set")

    def check_nothing_partial(self):
        from sspo import registry

        expect(registry.list_versions(self.root, "toy") == [], "a version is visible after the failed publish")
        expect(registry.list_aliases(self.root, "toy") == {}, "an alias was set by the failed publish")


class TrainPublish(S3Operation):
    name = "checkpoint publish of sspo train --output s3://"
    path = "/checkpoints/"
    skip = 2

    def prepare(self):
        self.folder, self.output = self.lab.folder("publish"), self.lab.s3_url("run")

    def run(self, **env):
        return self.lab.sspo(self.lab.train_argv(self.output), self.folder, **env)

    def check(self):
        self.lab.check_matches_straight(self.output)

    def check_nothing_partial(self):
        self.lab.published_checkpoints(self.output)


class Pull(S3Operation):
    name = "sspo registry pull"
    method = "GET"
    path = "/versions/"

    def __init__(self, lab):
        super().__init__(lab)
        self.root = lab.registry_with_a_version()

    def prepare(self):
        self.output = self.lab.folder("pull") / "pulled"

    def run(self, **env):
        with apply_env_temporarily(env):
            finished, escaped = sspo_here(["registry", "pull", "--registry", self.root, "--name", "toy",
                                           "--alias", "candidate", "--output", str(self.output)], self.lab.work)
        expect(not escaped, "traceback: an exception escaped main()", escaped)
        return finished

    def check(self):
        storage.verify_dir(self.output)
        expect(self.lab.same_weights(str(self.output), storage.join(self.lab.straight, "checkpoints", "step-0000004")),
               "the pulled weights differ from the registered checkpoint's")

    def check_nothing_partial(self):
        expect(not self.output.exists(), "the failed pull left its output folder")
        expect(not list(self.output.parent.glob(".*partial*")), "the failed pull left a partial download")


class Replay(S3Operation):
    name = "replay reads of sspo train --replay-from s3://"
    method = "GET"
    path = "/versions/"

    def __init__(self, lab):
        super().__init__(lab)
        self.version = storage.join(lab.registry_with_a_version(), "toy", "versions", "1")

    def prepare(self):
        self.folder = self.lab.folder("replay")
        self.cache = self.folder / "cache"  # its own, so that the pool entry is downloaded (through the faults)

    def run(self, **env):
        argv = ["train", "--params", "", *flags({"model": self.lab.base, "data": self.lab.data,
                                                 "output": str(self.folder / "run"), "replay_from": self.version,
                                                 **REPLAY})]
        return self.lab.sspo(argv, self.folder, SSPO_CACHE=str(self.cache), **env)

    def check(self):
        rows = read_log(str(self.folder / "run"))
        expect([row["ref_index"] for row in rows] == [1.0, 1.0], "the steps did not replay the S3 checkpoint")
        expect(list((self.cache / "files").iterdir()), "the pool entry was not fetched into the cache")

    def check_nothing_partial(self):
        expect(not self.lab.published_checkpoints(str(self.folder / "run")), "the failed run published a checkpoint")


@contextlib.contextmanager
def apply_env_temporarily(env: dict):
    previous = apply_env(env)
    try:
        yield
    finally:
        restore_env(previous)


def part_s3(lab: Lab, results: list[Case], quick: bool) -> None:
    part = "(b) S3 stopped, slow, 5xx, resets, lost replies, cut downloads"
    for operation_class in (Register, TrainPublish, Pull, Replay):
        operation = operation_class(lab)
        faults = PUT_FAULTS if operation.method == "PUT" else GET_FAULTS
        if quick:
            faults = faults[::2]
        for label, template in faults:
            run_case(results, part, f"{operation.name}: {label}", lambda: operation.attempt(template, outage=False))
        outage = Fault("stop", operation.method)  # down until cleared
        run_case(results, part, f"{operation.name}: {OUTAGE}", lambda: operation.attempt(outage, outage=True))


# -- (d) a NaN loss and (e) a corrupt replay pool entry


def nan_stop(lab: Lab, output_kind: str, step: int, last_good: int | None, resume: bool = False) -> str:
    import torch

    folder = lab.folder("nan")
    output = str(folder / "run") if output_kind == "local" else lab.s3_url("nan")
    finished = lab.sspo(lab.train_argv(output), folder, **{FAULT_ENV: f"nan-loss:{step}"})
    expect(finished.code == 2, f"exit {finished.code}, not 2", tail(finished.stderr))
    refusal(finished.stderr)
    error = finished.error_line()
    expect("training stopped" in error and f"step {step} has a loss of nan" in error, f"unexpected error: {error}")
    published = lab.published_checkpoints(output)
    expected = [f"step-{last_good:07d}"] if last_good else []
    expect(published == expected, f"published checkpoints are {published}, expected {expected}")
    expect(("no checkpoint was published" in error) if not last_good else expected[0] in error,
           f"the error does not name the last good checkpoint: {error}")
    for name in published:
        weights = lab.weights(storage.join(output, "checkpoints", name))
        expect(all(bool(torch.isfinite(t).all()) for t in weights.values()), f"{name} holds NaN weights")
    expect(not is_finished(output), "metrics.json was written")
    if not resume:
        return "stopped in one line, exit 2, last good checkpoint intact"
    resumed = lab.sspo(lab.train_argv(output), folder)
    expect(resumed.code == 0, f"the resume failed: {resumed.error_line()}", tail(resumed.stderr))
    lab.check_matches_straight(output)
    return "stopped in one line, exit 2; the resume ended bit-identical"


def part_nan(lab: Lab, results: list[Case], quick: bool) -> None:
    part = "(d) NaN loss injected"
    cases = [("local", 3, 2, True), ("local", 1, None, False), ("local", 2, None, False), ("s3", 3, 2, False)]
    for output_kind, step, last_good, resume in cases[:2] if quick else cases:
        run_case(results, part, f"{output_kind} run, NaN at step {step}",
                 lambda: nan_stop(lab, output_kind, step, last_good, resume))


def refused_pool_entry(lab: Lab, where: str) -> str:
    folder = lab.folder("corrupt")
    if where == "local checkpoint":
        entry = folder / "checkpoint"
        shutil.copytree(storage.join(lab.straight, "checkpoints", "step-0000002"), entry)
        flip_bytes(entry / "unet.safetensors")
        entry = str(entry)
    else:
        from sspo import config, registry

        root = lab.s3_url("registry")
        entry = registry.register(config.load("register", None, {"registry": root, "name": "toy", "alias": "",
                                                                  "checkpoint": lab.straight, "data": lab.data}))["url"]
        key = entry.removeprefix(f"s3://{BUCKET}/") + "/unet.safetensors"
        client = lab.s3.client()
        data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    output = str(folder / "run")
    argv = ["train", "--params", "", *flags({"model": lab.base, "data": lab.data, "output": output,
                                             "replay_from": entry, **REPLAY})]
    refused_as_damaged(lab.sspo(argv, folder, SSPO_CACHE=str(folder / "cache")))
    expect(not lab.published_checkpoints(output), "the refused run published a checkpoint")
    return "refused in one line, exit 2"


def refused_as_damaged(finished: Finished) -> None:
    expect(finished.code == 2, f"exit {finished.code}, not 2", tail(finished.stderr))
    refusal(finished.stderr)
    expect("does not match its sha256" in finished.error_line(), f"unexpected error: {finished.error_line()}")


def refused_damaged_latest(lab: Lab) -> str:
    folder = lab.folder("corrupt")
    run = folder / "run"
    shutil.copytree(lab.straight, run)
    flip_bytes(run / "checkpoints" / "step-0000004" / "unet.safetensors")
    refused_as_damaged(lab.sspo(lab.train_argv(str(run), steps=6), folder))
    expect(not (run / "checkpoints" / "step-0000006").exists(), "the refused resume published a checkpoint")
    return "refused in one line, exit 2"


def repaired_cache_copy(lab: Lab) -> str:
    """A cached copy of an S3 pool entry damaged on disk is downloaded again, not used."""
    folder = lab.folder("corrupt")
    version = storage.join(lab.registry_with_a_version(), "toy", "versions", "1")
    cache = folder / "cache"
    with apply_env_temporarily({"SSPO_CACHE": str(cache)}):
        cached = storage.fetch_file(version, "unet.safetensors")
    flip_bytes(cached)
    argv = ["train", "--params", "", *flags({"model": lab.base, "data": lab.data, "output": str(folder / "run"),
                                             "replay_from": version, **REPLAY})]
    finished = lab.sspo(argv, folder, SSPO_CACHE=str(cache))
    expect(finished.code == 0, f"failed (exit {finished.code}): {finished.error_line()}", tail(finished.stderr))
    expect(not lab.corrupt_cache_files(cache), "the damaged copy is still in the cache")
    return "damaged cached copy downloaded again, run succeeded"


def part_corrupt(lab: Lab, results: list[Case], quick: bool) -> None:
    part = "(e) corrupt replay pool entry"
    run_case(results, part, "--replay-from a local checkpoint with flipped bytes",
             lambda: refused_pool_entry(lab, "local checkpoint"))
    run_case(results, part, "--replay-from an S3 registry version overwritten on the server",
             lambda: refused_pool_entry(lab, "s3 version"))
    if not quick:
        run_case(results, part, "resume of a run whose latest checkpoint's weights are damaged",
                 lambda: refused_damaged_latest(lab))
        run_case(results, part, "a damaged cached copy of an S3 pool entry", lambda: repaired_cache_copy(lab))


# -- (c) generated bad inputs


class CountingPort:
    """A loopback port that accepts connections, counts and closes them: the Kubeflow host of `pipeline submit`
    cases, which must fail before they send anything."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


@dataclass
class BadInput:
    family: str
    argv: list[str]
    expected: tuple[str, ...] = (REFUSED, USAGE)
    # checks an accepted run's output; returns the outcome (CONVERTED, SKIPPED, ACCEPTED) or raises CaseFailed
    accepted: Callable[[], str] | None = None
    # what a refused run must not have left: returns a description of anything published, or ""
    published: Callable[[], str] = lambda: ""
    note: str = ""  # what the argv does not show (a file's content), for the report of a failed case


def judge(bad: BadInput, cwd: Path) -> str:
    finished, escaped = sspo_here(bad.argv, cwd)
    shown = f"sspo {' '.join(a if a.isprintable() and a and ' ' not in a else repr(a) for a in bad.argv)}"[:600]
    shown += f"\n{bad.note}" if bad.note else ""
    expect(not escaped, "traceback: an exception escaped main()", f"{shown}\n{tail(escaped, 8)}")
    try:
        if finished.code == 0:
            expect(bad.accepted is not None, "exit 0 for an input that must be refused")
            outcome = bad.accepted()
        else:
            expect(finished.code == 2, f"exit {finished.code}, not 2")
            outcome = refusal(finished.stderr)
            left = bad.published()
            expect(not left, f"refused, but published {left}")
        expect(outcome in bad.expected, f"{outcome}, expected {' or '.join(bad.expected)}")
    except CaseFailed as failed:
        raise CaseFailed(failed.why, f"{shown}\n{failed.detail or tail(finished.stderr, 6)}") from None
    return outcome


# image and file makers


def png(image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def jpeg(image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **params)
    return buffer.getvalue()


def picture(rng: random.Random, width: int = 0, height: int = 0, mode: str = "RGB"):
    """A random-coloured image with a rectangle on it (something a scaler can get wrong)."""
    from PIL import Image, ImageDraw

    width, height = width or rng.randint(8, 64), height or rng.randint(8, 64)
    colour = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (width, height), colour)
    ImageDraw.Draw(image).rectangle([width // 4, height // 4, width // 2, height // 2],
                                    fill=tuple(255 - c for c in colour))
    return image.convert(mode) if mode != "RGB" else image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, bit_depth: int = 8, colour_type: int = 2, rows: bytes = b"") -> bytes:
    """A PNG whose header claims width x height, holding `rows` of pixel data (none: a header-only bomb)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def jpeg_declaring(rng: random.Random, width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is patched to claim width x height."""
    data = bytearray(jpeg(picture(rng, 16, 16)))
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 62, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24,
                                                                        0, 0, 2835, 2835, 0, 0)
    return header + b"\0" * 8


def rgb48_png(rng: random.Random) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write these, so it is built by hand)."""
    width, height = rng.randint(4, 32), rng.randint(4, 32)
    rows = b"".join(b"\0" + bytes(rng.randrange(256) for _ in range(width * 6)) for _ in range(height))
    return png_declaring(width, height, 16, 2, rows)


def exif_rotated(orientation: int) -> bytes:
    """A 48x24 JPEG, red on the left half and blue on the right, with an EXIF orientation tag."""
    from PIL import Image

    image = Image.new("RGB", (48, 24), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 24, 24))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(image, exif=exif.tobytes(), quality=95)


# Where the red half must end up once the orientation tag is applied (the EXIF spec's rotations).
RED_AFTER = {1: "left", 3: "right", 6: "top", 8: "bottom"}


def parquet_bytes(columns: dict, schema=None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buffer)
    return buffer.getvalue()


GOOD = "good"  # a sample prepare must keep
BAD = "bad"  # a sample prepare must refuse (or skip and count)
EITHER = "either"  # may be kept or refused, as long as nothing breaks


def image_sample(rng: random.Random, family: str) -> tuple[str, bytes, str, Callable | None]:
    """(file extension, bytes, verdict, extra check of the prepared pixels) of one sample image."""
    from PIL import Image

    if family == "truncated image":
        extension, maker = rng.choice([(".png", png), (".jpg", jpeg)])
        data = maker(picture(rng))
        return extension, data[: rng.randint(1, len(data) - 1)], EITHER, None
    if family == "garbage bytes":
        prefix = rng.choice([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"RIFF\0\0\0\0WEBP", b"GIF89a"])
        return rng.choice([".png", ".jpg", ".webp", ".bmp"]), prefix + rng.randbytes(rng.randint(0, 300)), BAD, None
    if family == "empty file":
        return rng.choice([".png", ".jpg"]), b"", BAD, None
    if family == "huge declared dimensions":
        kind = rng.choice(["png", "jpeg", "bmp"])
        if kind == "png":
            size = rng.choice([(100_000, 100_000), (2**31 - 1, 1), (1, 2**31 - 1), (70_000, 1_000), (9_000, 9_000)])
            return ".png", png_declaring(*size), BAD, None
        if kind == "jpeg":
            return ".jpg", jpeg_declaring(rng, rng.choice([65_535, 20_000]), 65_535), BAD, None
        return ".bmp", bmp_declaring(rng.choice([100_000, 2**31 - 1]), rng.choice([100_000, -100_000])), BAD, None
    if family == "dimensions under the limit, no pixel data":
        return ".png", png_declaring(rng.choice([4_000, 6_000]), rng.choice([4_000, 6_000])), BAD, None
    if family == "CMYK JPEG":
        return ".jpg", jpeg(picture(rng, mode="CMYK")), GOOD, None
    if family == "16-bit PNG":
        if rng.random() < 0.5:
            return ".png", rgb48_png(rng), GOOD, None
        grey = Image.new("I;16", (rng.randint(4, 40), rng.randint(4, 40)), rng.randrange(65536))
        return ".png", png(grey), GOOD, None
    if family == "EXIF-rotated JPEG":
        orientation = rng.choice(list(RED_AFTER))
        return ".jpg", exif_rotated(orientation), GOOD, lambda pixels: check_red_side(pixels, RED_AFTER[orientation])
    if family == "broken EXIF orientation":
        data = bytearray(exif_rotated(6))
        tag = data.index(b"\x01\x12\x00\x03")  # the orientation entry (big-endian TIFF as PIL writes it)
        data[tag + 8:tag + 10] = struct.pack(">H", rng.choice([0, 9, 255, 65535]))
        return ".jpg", bytes(data), EITHER, None
    if family == "palette, alpha, grey or 1-bit image":
        mode = rng.choice(["P", "RGBA", "LA", "L", "1", "P with a transparent colour"])
        if mode.startswith("P with"):
            return ".png", png(picture(rng, mode="P"), transparency=0), GOOD, None
        return ".png", png(picture(rng, mode=mode)), GOOD, None
    if family == "tiny or extreme aspect image":
        width, height = rng.choice([(1, 1), (1, 3), (2_000, 1), (1, 2_000), (3, 1_500)])
        return ".png", png(picture(rng, width, height)), GOOD, None
    if family == "image under the wrong extension":
        maker = rng.choice([jpeg, png])
        extension = ".png" if maker is jpeg else rng.choice([".jpg", ".webp", ".bmp"])
        return extension, maker(picture(rng)), GOOD, None
    raise ValueError(family)


def check_red_side(pixels, side: str) -> None:
    red = pixels[0].float()  # (R, R) red channel of the one sample
    half = red.shape[0] // 2
    halves = {"left": red[:, :half], "right": red[:, half:], "top": red[:half], "bottom": red[half:]}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[side]
    expect(halves[side].mean() > halves[opposite].mean() + 100, f"the red half is not on the {side} after EXIF")


CAPTION_FAMILIES = {
    "empty or blank caption": BAD,
    "unicode caption": GOOD,
    "very long caption": GOOD,
    "caption not UTF-8": BAD,
    "missing caption file": BAD,
}
UNICODE_CAPTIONS = ["a red circle on the left 🔴", "一个红色的圆 在左边", "دائرة حمراء", "zero\u200bwidth joiner",
                    "combining a\u0301\u0302\u0303", "tab\tand\u00a0nbsp", "nul \x00 inside", "emoji 👩‍👩‍👧‍👦 family",
                    "\U0001f600" * 50, "right-to-left \u202e override"]


def caption_sample(rng: random.Random, family: str) -> tuple[bytes | None, str]:
    if family == "empty or blank caption":
        return rng.choice(["", " ", "\n", "\t \r\n", "\u3000"]).encode(), BAD
    if family == "unicode caption":
        return rng.choice(UNICODE_CAPTIONS).encode(), GOOD
    if family == "very long caption":
        return ("a red circle on the left " * rng.randint(400, 8_000)).encode(), GOOD
    if family == "caption not UTF-8":
        return rng.choice([b"\xff\xfe\x00a", b"caf\xe9", b"\xc3\x28", "caption".encode("utf-16")]), BAD
    return None, BAD  # missing caption file


def nothing_at(output: Path) -> Callable[[], str]:
    """A check that nothing was published at the local `output`, nor a staging folder left beside it."""
    def published() -> str:
        if os.path.exists(output):  # False, not an error, for a name too long to exist
            return str(output)
        leftovers = list(output.parent.glob(".sspo-staging-*"))
        return str(leftovers[0]) if leftovers else ""
    return published


class PrepareInputs:
    """Generators of bad (and odd but valid) sources, outputs and flags for `sspo prepare`."""

    IMAGE_FAMILIES = ["truncated image", "garbage bytes", "empty file", "huge declared dimensions",
                      "dimensions under the limit, no pixel data", "CMYK JPEG", "16-bit PNG", "EXIF-rotated JPEG",
                      "broken EXIF orientation", "palette, alpha, grey or 1-bit image", "tiny or extreme aspect image",
                      "image under the wrong extension"]

    def __init__(self, lab: Lab):
        self.lab = lab

    def families(self) -> list[Callable[[random.Random, Path], BadInput]]:
        images = [lambda rng, d, f=f: self.folder_case(rng, d, f, image=True) for f in self.IMAGE_FAMILIES]
        captions = [lambda rng, d, f=f: self.folder_case(rng, d, f, image=False) for f in CAPTION_FAMILIES]
        return [*images, *captions, self.jsonl_format, self.jsonl_sample, self.parquet_format, self.parquet_sample,
                self.bad_source_url, self.bad_output, self.bad_flag, self.bad_params_file]

    def argv(self, source: str, output: str, *extra: str) -> list[str]:
        return ["prepare", "--params", "", "--source", source, "--output", output, *extra]

    def outcome_check(self, output: Path, kept: int, bad: int, captions: dict, pixels_check=None):
        """An accepted run: the output verifies, holds `kept` samples with their captions, counts `bad` skipped."""
        def accepted() -> str:
            from sspo.train.data import ShardDataset

            manifest = storage.verify_dir(output)
            skipped = sum(manifest.get("skipped", {}).values())
            expect(skipped == bad and manifest["num_samples"] == kept,
                   f"kept {manifest['num_samples']} and skipped {skipped}; expected {kept} and {bad}")
            data = ShardDataset(str(output))
            rows = data.rows(range(len(data)))
            expect(tuple(rows["winner"].shape) == (kept, 3, 32, 32), f"shards hold {tuple(rows['winner'].shape)}")
            for caption in captions.values():
                expect(caption in rows["captions"], f"caption {caption[:40]!r}… not kept as given")
            if pixels_check:
                pixels_check(rows["winner"][rows["captions"].index(captions["sample"])])
            return SKIPPED if bad else CONVERTED
        return accepted

    def sample_case(self, rng, d: Path, family: str, verdict: str, source: Path, write_good: Callable,
                    captions: dict, pixels_check=None, on_error_ok: bool = True) -> BadInput:
        """One odd sample alone, next to a good one, or alone with on_error=fail; the outcomes that are right."""
        variant = rng.choice(["alone", "next to a good sample", "on_error=fail"] if on_error_ok else
                             ["alone", "next to a good sample"])
        extra = ["--on-error", "fail"] if variant == "on_error=fail" else []
        output = d / "out"
        if variant == "next to a good sample":
            captions = {**captions, "good": write_good()}
        good = len(captions) - 1
        expected = {GOOD: (CONVERTED,), BAD: (SKIPPED,) if good else (REFUSED,),
                    EITHER: (SKIPPED, CONVERTED) if good else (REFUSED, CONVERTED)}[verdict]
        if verdict == BAD:
            check = self.outcome_check(output, good, 1, {k: v for k, v in captions.items() if k != "sample"})
        else:
            kept_check = self.outcome_check(output, good + 1, 0, captions, pixels_check)
            skipped_check = self.outcome_check(output, good, 1, {k: v for k, v in captions.items() if k != "sample"})

            def check(kept_check=kept_check, skipped_check=skipped_check):
                manifest = json.loads((output / storage.MANIFEST).read_text())
                return (skipped_check if manifest.get("skipped") else kept_check)()
        return BadInput(family, self.argv(str(source), str(output), *extra), expected, check,
                        nothing_at(output))

    def folder_case(self, rng, d: Path, family: str, image: bool) -> BadInput:
        source = d / "src"
        source.mkdir()
        pixels_check = None
        if image:
            extension, data, verdict, pixels_check = image_sample(rng, family)
            caption = "a red circle on the left"
            (source / f"sample{extension}").write_bytes(data)
            (source / "sample.txt").write_text(caption)
        else:
            caption_bytes, verdict = caption_sample(rng, family)
            (source / "sample.png").write_bytes(png(picture(rng)))
            if caption_bytes is not None:
                (source / "sample.txt").write_bytes(caption_bytes)
            caption = caption_bytes.decode("utf-8", "replace").strip() if caption_bytes else ""

        def write_good() -> str:
            (source / "good.png").write_bytes(png(picture(rng)))
            (source / "good.txt").write_text("a blue square at the top")
            return "a blue square at the top"

        return self.sample_case(rng, d, family, verdict, source, write_good, {"sample": caption}, pixels_check)

    def jsonl_format(self, rng, d: Path) -> BadInput:
        """A metadata.jsonl the reader must refuse as a whole."""
        source = d / "src"
        source.mkdir()
        (source / "a.png").write_bytes(png(picture(rng)))
        good = json.dumps({"file": "a.png", "caption": "a red circle on the left"})
        kind = rng.choice(["line not JSON", "line not an object", "record missing keys", "not UTF-8", "empty",
                           "only blank lines", "keep-pairs without losers"])
        bad_line = {"line not JSON": rng.choice(["{", "{'file': 'a.png'}", "nan", "{\"file\": \"a.png\",}", "\x00"]),
                    "line not an object": rng.choice(["[1, 2]", "42", "\"a.png\"", "null", "true"]),
                    "record missing keys": json.dumps(rng.choice([{"file": "a.png"}, {"caption": "x"}, {}]))
                    }.get(kind, "")
        lines = [good, bad_line] if bad_line else [good]
        rng.shuffle(lines)
        text = "\n".join(lines) + "\n"
        data = {"not UTF-8": text.encode() + b"\xff\xfe\n", "empty": b"", "only blank lines": b"\n \n\t\n"
                }.get(kind, text.encode())
        (source / "metadata.jsonl").write_bytes(data)
        extra = ["--keep-pairs"] if kind == "keep-pairs without losers" else []
        return BadInput(f"JSONL source: {kind}", self.argv(str(source), str(d / "out"), *extra),
                        published=nothing_at(d / "out"))

    def jsonl_sample(self, rng, d: Path) -> BadInput:
        """One odd record of a metadata.jsonl."""
        source = d / "src"
        source.mkdir()
        (source / "a.png").write_bytes(png(picture(rng)))
        (source / "folder.png").mkdir()
        kind = rng.choice(["caption of the wrong type", "file of the wrong type", "file outside the source",
                           "file is a folder or missing", "odd split values", "very long caption line",
                           "byte order mark"])
        record: dict = {"file": "a.png", "caption": "a red circle on the left"}
        verdict = BAD
        if kind == "caption of the wrong type":
            record["caption"] = rng.choice([42, None, ["a", "b"], {"text": "x"}, True, 1.5])
        elif kind == "file of the wrong type":
            record["file"] = rng.choice([42, None, ["a.png"], {"path": "a.png"}, True, ""])
        elif kind == "file outside the source":
            record["file"] = rng.choice(["../../../../etc/hostname", "/etc/hostname", "../" * 12 + "etc/passwd"])
        elif kind == "file is a folder or missing":
            record["file"] = rng.choice(["folder.png", "missing.png", "./", "."])
        elif kind == "odd split values":
            record["split"], verdict = rng.choice([7, ["a"], {"b": 1}, None, "", "ünïcödé"]), GOOD
        elif kind == "very long caption line":
            record["caption"], verdict = "a red circle " * rng.randint(1_000, 50_000), GOOD
        else:  # a byte order mark before the first record
            verdict = EITHER
        raw = ("\ufeff" if kind == "byte order mark" else "") + json.dumps(record, ensure_ascii=rng.random() < 0.5)
        raw += "\n"
        caption = record["caption"].strip() if isinstance(record["caption"], str) else ""

        def write_good() -> str:
            nonlocal raw
            (source / "b.png").write_bytes(png(picture(rng)))
            raw += json.dumps({"file": "b.png", "caption": "a blue square at the top"}) + "\n"
            return "a blue square at the top"

        case = self.sample_case(rng, d, f"JSONL record: {kind}", verdict, source, write_good, {"sample": caption})
        (source / "metadata.jsonl").write_text(raw)
        if verdict == EITHER:  # a BOM-damaged first line is a format error, which refuses the whole file
            case.expected = (*case.expected, REFUSED)
        return case

    def good_parquet_columns(self, rng, rows: int = 1) -> dict:
        return {"caption": ["a red circle on the left"] * rows,
                "jpg_0": [jpeg(picture(rng)) for _ in range(rows)],
                "jpg_1": [jpeg(picture(rng)) for _ in range(rows)],
                "label_0": [1.0] * rows}

    def parquet_format(self, rng, d: Path) -> BadInput:
        """A parquet source the reader must refuse as a whole."""
        import pyarrow as pa

        kind = rng.choice(["truncated file", "random bytes", "column of the wrong type", "missing column",
                           "no rows"])
        columns = self.good_parquet_columns(rng, 2)
        if kind == "truncated file":
            data = parquet_bytes(columns)
            data = data[: rng.randint(0, len(data) - 1)]
        elif kind == "random bytes":
            data = rng.choice([b"PAR1", b""]) + rng.randbytes(rng.randint(0, 2_000))
        elif kind == "column of the wrong type":
            wrong = {"caption": [[1, 2], [1.5, 2.5], [b"a", b"b"], [[1], [2]]],
                     "jpg_0": [["not bytes", "x"], [1, 2]], "jpg_1": [["not bytes", "x"], [1, 2]],
                     "label_0": [["1", "0"], [True, False], [b"1", b"0"]]}
            column = rng.choice(list(wrong))
            columns[column] = rng.choice(wrong[column])
            data = parquet_bytes(columns)
        elif kind == "missing column":
            columns.pop(rng.choice(list(columns)))
            data = parquet_bytes(columns)
        else:
            schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                                ("label_0", pa.float64())])
            data = parquet_bytes({name: [] for name in schema.names}, schema)
        source = d / "train.parquet"
        source.write_bytes(data)
        return BadInput(f"parquet source: {kind}", self.argv(str(source), str(d / "out")),
                        published=nothing_at(d / "out"))

    def parquet_sample(self, rng, d: Path) -> BadInput:
        """One odd row of a Pick-a-Pic-style parquet file."""
        import pyarrow as pa

        kind = rng.choice(["label null or NaN", "label a tie", "label outside 0..1", "image bytes null or garbage",
                           "large or dictionary types"])
        row = self.good_parquet_columns(rng)
        verdict, schema = BAD, None
        if kind == "label null or NaN":
            row["label_0"] = [rng.choice([None, float("nan")])]
        elif kind == "label a tie":
            row["label_0"] = [0.5]
        elif kind == "label outside 0..1":
            row["label_0"], verdict = [rng.choice([2.0, -1.0, 7.0, float("inf"), -float("inf")])], EITHER
        elif kind == "image bytes null or garbage":
            winner = "jpg_0" if row["label_0"][0] > 0.5 else "jpg_1"
            row[winner] = [rng.choice([None, b"", rng.randbytes(50), b"\xff\xd8\xff"])]
        else:
            verdict = EITHER
            schema = pa.schema([("caption", rng.choice([pa.large_string(), pa.dictionary(pa.int32(), pa.string())])),
                                ("jpg_0", pa.large_binary()), ("jpg_1", pa.binary()), ("label_0", pa.float32())])
        rows = [row]

        def write_good() -> str:
            rows.append(self.good_parquet_columns(rng) | {"caption": ["a blue square at the top"]})
            return "a blue square at the top"

        caption = "a red circle on the left"
        case = self.sample_case(rng, d, f"parquet row: {kind}", verdict, d / "train.parquet", write_good,
                                {"sample": caption}, on_error_ok=kind != "label a tie")
        columns = {name: [value for r in rows for value in r[name]] for name in row}
        if schema is not None and pa.types.is_dictionary(schema.field("caption").type):
            columns["caption"] = pa.array(columns["caption"]).dictionary_encode()
        (d / "train.parquet").write_bytes(parquet_bytes(columns, schema))
        return case

    def bad_source_url(self, rng, d: Path) -> BadInput:
        closed = free_port()
        source = rng.choice(["", " ", "s3://", f"s3://{BUCKET}", "s3://no-such-bucket-sspo/src",
                             f"s3://{BUCKET}/missing-{uuid.uuid4().hex[:6]}", f"http://127.0.0.1:{closed}/src",
                             "foo://bar", "dvc://", "dvc://data?repo=/nonexistent&rev=main", "file:///nonexistent/x",
                             "/nonexistent/x", "src\x00x", "x" * rng.randint(256, 5_000), "memory://nothing-here",
                             "~nobody-sspo/x", "gs://bucket/x", "::", "s3://bucket/with space/?#", str(d)])
        return BadInput("bad source URL", self.argv(source, str(d / "out")), published=nothing_at(d / "out"))

    def bad_output(self, rng, d: Path) -> BadInput:
        source = d / "src"
        source.mkdir()
        (source / "a.png").write_bytes(png(picture(rng)))
        (source / "a.txt").write_text("a red circle on the left")
        (d / "a-file").write_text("not a folder")
        output = rng.choice(["", "dvc://data/out", self.lab.data, str(d / "a-file" / "out"), "/proc/sspo-out",
                             str(d / ("o" * 300)), str(d / "out\x00x"), "s3://no-such-bucket-sspo/out",
                             "foo://out", str(source)])
        checkable = storage.is_local(output) and output not in ("", self.lab.data, str(source)) and "\x00" not in output
        return BadInput("bad output URL", self.argv(str(source), output),
                        published=nothing_at(Path(output) if checkable else d / "never-used"))

    def bad_flag(self, rng, d: Path) -> BadInput:
        source = d / "src"
        source.mkdir()
        (source / "a.png").write_bytes(png(picture(rng)))
        (source / "a.txt").write_text("a red circle on the left")
        flag, values = rng.choice([("--resolution", ["abc", "-1", "0", "7", "1.5", "nan", "", "1e3", "0x20", "inf"]),
                                   ("--limit", ["-1", "abc", "1.5", "nan", ""]),
                                   ("--format", ["xml", "", "FOLDER", "parquet;rm"]),
                                   ("--on-error", ["maybe", "", "SKIP"]),
                                   ("--max-pixels", ["0", "-5", "abc", "nan", "inf", "1e99"]),
                                   ("--keep-pairs", ["yes"]), ("--no-such-flag", ["1"])])
        return BadInput(f"bad {flag}", self.argv(str(source), str(d / "out"), flag, rng.choice(values)),
                        published=nothing_at(d / "out"))

    def bad_params_file(self, rng, d: Path) -> BadInput:
        source = d / "src"
        source.mkdir()
        (source / "a.png").write_bytes(png(picture(rng)))
        (source / "a.txt").write_text("a red circle on the left")
        params = d / "params.yaml"
        content = rng.choice([None, b"prepare: [", b"- 1\n- 2\n", b"42\n", b"prepare: 5\n", b"prepare: [a, b]\n",
                              b"prepare: {resolution: abc}\n", b"prepare: {nope: 1}\n", b"prepare: {resolution: [1]}\n",
                              b"prepare: {resolution: {a: 1}}\n", b"\xff\xfe\x00\x01", b"prepare: {limit: -3}\n"])
        if content is not None:
            params.write_bytes(content)
        argv = ["prepare", "--params", str(params), "--source", str(source), "--output", str(d / "out")]
        return BadInput("bad params file", argv, published=nothing_at(d / "out"),
                        note=f"params file: {content!r}")


class EvaluateInputs:
    """Bad models, checkpoints, prompt sets, flags and outputs for `sspo evaluate` (fast settings otherwise)."""

    def __init__(self, lab: Lab, shared: Path):
        self.lab = lab
        checkpoint = storage.join(lab.straight, "checkpoints", "step-0000002")
        self.damaged, self.unpublished = shared / "damaged-checkpoint", shared / "unpublished-checkpoint"
        shutil.copytree(checkpoint, self.damaged)
        flip_bytes(self.damaged / "unet.safetensors")
        shutil.copytree(checkpoint, self.unpublished)
        (self.unpublished / storage.MANIFEST).unlink()
        self.broken_model = shared / "broken-model"  # its UNet weights file cut short
        shutil.copytree(lab.base, self.broken_model)
        weights = next((self.broken_model / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])

    def families(self):
        return [self.bad_model, self.bad_checkpoint, self.bad_prompts, self.odd_prompts, self.bad_flag,
                self.bad_output]

    def argv(self, d: Path, **overrides) -> list[str]:
        values = {"model": self.lab.base, "prompts": "toy:train", "max_prompts": 1, "seeds": 0, "sample_steps": 1,
                  "batch_size": 4, "grid_prompts": 1, "bootstrap_samples": 10, "output": str(d / "out"), **overrides}
        return ["evaluate", "--params", "", *flags(values)]

    def accepted(self, output: Path) -> Callable[[], str]:
        def check() -> str:
            storage.verify_dir(output)
            expect((output / "metrics.json").exists(), "no metrics.json")
            return ACCEPTED
        return check

    def case(self, family: str, d: Path, expected=(REFUSED, USAGE), **overrides) -> BadInput:
        output = Path(overrides.get("output", d / "out"))
        accepted = self.accepted(output) if ACCEPTED in expected else None
        return BadInput(family, self.argv(d, **overrides), expected, accepted, nothing_at(d / "out"))

    def pointer(self, d: Path, rng) -> str:
        path = d / "pointer.json"
        content = rng.choice(["{", "[1, 2]", "{\"url\": 5}", "{\"url\": \"/nonexistent\"}", "{}", "null",
                              json.dumps({"url": str(path)})])
        path.write_text(content)
        return str(path)

    def bad_model(self, rng, d: Path) -> BadInput:
        (d / "empty").mkdir()
        (d / "file").write_text("x")
        model = rng.choice(["/nonexistent/model", str(d / "empty"), str(d / "file"), self.lab.data,
                            str(self.broken_model), f"s3://{BUCKET}/no-model", "", "dvc://model?repo=/nonexistent"])
        return self.case("bad --model", d, model=model)

    def bad_checkpoint(self, rng, d: Path) -> BadInput:
        (d / "empty").mkdir()
        checkpoint = rng.choice(["/nonexistent/ckpt", str(d / "empty"), self.lab.data, str(self.damaged),
                                 str(self.unpublished), self.pointer(d, rng), f"s3://{BUCKET}/no-checkpoint",
                                 self.lab.base])
        return self.case("bad --checkpoint", d, checkpoint=checkpoint)

    def bad_prompts(self, rng, d: Path) -> BadInput:
        kind = rng.choice(["text file", "JSONL file", "set list"])
        if kind == "text file":
            prompts = d / "prompts.txt"
            prompts.write_bytes(rng.choice([b"", b"\n\n  \n", b"\xff" + rng.randbytes(200), b"caf\xe9\n"]))
        elif kind == "JSONL file":
            prompts = d / "prompts.jsonl"
            prompts.write_bytes(rng.choice([b"", b"{\n", b"[1]\n", b"null\n", b"{\"prompt\": 5}\n",
                                            b"{\"text\": \"x\"}\n", b"\xff\xfe\x00a\n"]))
        else:
            prompts = d / "good.txt"
            prompts.write_text("a red circle on the left\n")
        spec = str(prompts) if kind != "set list" else rng.choice([
            "toy:nope", "/nonexistent/prompts.txt", f"a={prompts},a={prompts}", "=", "name=", "toy:train,toy:train",
            ",", f"={prompts}"])
        return self.case(f"bad --prompts ({kind})", d, prompts=spec)

    def odd_prompts(self, rng, d: Path) -> BadInput:
        prompts = d / "prompts.txt"
        prompts.write_text("\n".join(rng.sample(UNICODE_CAPTIONS, 2) + ["word " * rng.randint(100, 3_000)]) + "\n")
        return self.case("unicode and very long prompts", d, (ACCEPTED,), prompts=f"odd={prompts}", max_prompts=3)

    def bad_flag(self, rng, d: Path) -> BadInput:
        name, values = rng.choice([("seeds", ["a", "", ",", "1.5", "-1", "1,a"]),
                                   ("sample_steps", ["0", "-1", "abc", "1.5"]),
                                   ("guidance", ["nan", "abc", ""]),
                                   ("batch_size", ["0", "-1", "x"]),
                                   ("max_prompts", ["-1", "many"]),
                                   ("scorers", ["nope", "", "oracle,nope"]),
                                   ("scorer_paths", ["x", "pickscore=/nonexistent"]),
                                   ("bootstrap_samples", ["0", "-10"]),
                                   ("grid_prompts", ["-1"]),
                                   ("rescore", ["/nonexistent", self.lab.data, str(d)])])
        value = rng.choice(values)
        overrides = {name: value}
        if name == "scorer_paths" and "=" in value:
            overrides["scorers"] = "pickscore"
        return self.case(f"bad --{name.replace('_', '-')}", d, **overrides)

    def bad_output(self, rng, d: Path) -> BadInput:
        (d / "a-file").write_text("x")
        output = rng.choice(["dvc://eval", self.lab.data, str(d / "a-file" / "out"), str(d / ("o" * 300)),
                             str(d / "out\x00")])
        case = self.case("bad --output", d, output=output)
        case.published = nothing_at(d / "never-used")
        return case


class RegisterInputs:
    """Bad registries, names, checkpoints, data, metrics and outputs for `sspo register`."""

    def __init__(self, lab: Lab, evaluate: EvaluateInputs):
        self.lab, self.evaluate = lab, evaluate

    def families(self):
        return [self.bad_registry, self.bad_name, self.bad_checkpoint, self.bad_data, self.bad_metrics,
                self.bad_output]

    def case(self, family: str, d: Path, registry: str = "", **overrides) -> BadInput:
        registry = registry or str(d / "registry")
        values = {"registry": registry, "name": "toy", "checkpoint": self.lab.straight, "data": self.lab.data,
                  "alias": "candidate", **overrides}
        record = overrides.get("output")

        def published() -> str:
            if storage.is_local(registry) and os.path.isdir(registry):
                made = [str(p) for p in Path(registry).rglob("*") if p.name == storage.MANIFEST or
                        p.parent.name == "aliases"]
                if made:
                    return made[0]
            if record and storage.is_local(record) and os.path.isfile(record):
                return record
            return ""

        return BadInput(family, ["register", "--params", "", *flags(values)], published=published)

    def bad_registry(self, rng, d: Path) -> BadInput:
        (d / "a-file").write_text("x")
        registry = rng.choice(["dvc://registry", "s3://", "s3://no-such-bucket-sspo/registry",
                               f"http://127.0.0.1:{free_port()}/registry", str(d / "a-file" / "registry"),
                               str(d / "reg\x00"), "/proc/sspo-registry", "foo://registry"])
        return self.case("bad --registry", d, registry)

    def bad_name(self, rng, d: Path) -> BadInput:
        field_name = rng.choice(["name", "version", "alias"])
        value = rng.choice(["../x", "a/b", ".hidden", "-x", "a b", "模型", "x" * rng.randint(256, 3_000), "/",
                            "..", "a\x00b", "a\nb", "x\n", "" if field_name == "name" else "~"])
        return self.case(f"bad --{field_name}", d, **{field_name: value})

    def bad_checkpoint(self, rng, d: Path) -> BadInput:
        (d / "empty").mkdir()
        checkpoint = rng.choice(["/nonexistent/ckpt", str(d / "empty"), self.lab.data, str(self.evaluate.damaged),
                                 str(self.evaluate.unpublished), self.evaluate.pointer(d, rng),
                                 f"s3://{BUCKET}/no-checkpoint", self.lab.base, ""])
        return self.case("bad --checkpoint", d, checkpoint=checkpoint)

    def bad_data(self, rng, d: Path) -> BadInput:
        (d / "empty").mkdir()
        (d / "file").write_text("x")
        data = rng.choice(["/nonexistent/data", str(d / "empty"), str(d / "file"), f"s3://{BUCKET}/no-data",
                           "dvc://data?repo=/nonexistent"])
        return self.case("bad --data", d, data=data)

    def bad_metrics(self, rng, d: Path) -> BadInput:
        metrics = d / "metrics.json"
        metrics.write_bytes(rng.choice([b"{", b"", rng.randbytes(100), b"\xff\xfe"]))
        (d / "a-folder").mkdir()
        return self.case("bad --metrics", d, metrics=rng.choice([str(metrics), "/nonexistent/metrics.json",
                                                                 str(d / "a-folder")]))

    def bad_output(self, rng, d: Path) -> BadInput:
        (d / "a-folder").mkdir()
        (d / "a-file").write_text("x")
        output = rng.choice(["dvc://registered.json", str(d / "a-folder"), str(d / "a-file" / "record.json"),
                             str(d / "rec\x00.json"), str(d / ("r" * 300))])
        return self.case("bad --output", d, output=output)


class PipelineInputs:
    """Bad parameters for `sspo pipeline submit`: each must fail before anything is sent to the host."""

    REQUIRED = ["model_uri=s3://b/model", "data_uri=s3://b/data", "registry_url=s3://b/registry"]
    BAD_VALUES = {
        "steps": ["abc", "1.5", "-1", "0", "", "1e3", "nan", "[1]"],
        "batch_size": ["0", "-4", "x"], "save_every": ["0", "-1"], "sample_steps": ["0", "two"],
        "lora_rank": ["-3", "1.5"], "resolution": ["0", "7", "abc"], "data_limit": ["-1", "x"],
        "eval_sample_steps": ["0", "-2"], "learning_rate": ["abc", "nan", "-1", "0"], "beta": ["0", "-1", "nan"],
        "eval_guidance": ["nan", "abc"], "min_win_rate": ["2", "-0.1", "nan", "abc"], "min_improvement": ["nan", "x"],
        "objective": ["ppo", ""], "replay": ["nope", ""], "data_format": ["xml"], "model_name": ["../x", "", "a b"],
        "promotion_split": ["nope", ""], "eval_seeds": ["a", "1.5", ""], "eval_scorers": [""],
        "eval_prompts": [""],
    }

    def __init__(self, host: CountingPort):
        self.host = host

    def families(self):
        return [self.bad_value, self.bad_name, self.bad_params_file, self.bad_flag]

    def case(self, family: str, *args: str) -> BadInput:
        connections_before = self.host.connections

        def published() -> str:
            made = self.host.connections - connections_before
            return f"{made} connection(s) to the host" if made else ""

        argv = ["pipeline", "submit", "--host", self.host.url, *args]
        return BadInput(family, argv, published=published)

    def with_required(self, *params: str) -> list[str]:
        return [item for param in [*self.REQUIRED, *params] for item in ("--param", param)]

    def bad_value(self, rng, d: Path) -> BadInput:
        name = rng.choice(list(self.BAD_VALUES))
        return self.case(f"bad {name} value", *self.with_required(f"{name}={rng.choice(self.BAD_VALUES[name])}"))

    def bad_name(self, rng, d: Path) -> BadInput:
        param = rng.choice(["nope=1", "=1", "steps", "", "Steps=10", "步骤=1", "x" * 500 + "=1"])
        params = self.with_required(param) if rng.random() < 0.7 else ["--param", param]
        return self.case("unknown, empty or missing parameter", *params)

    def bad_params_file(self, rng, d: Path) -> BadInput:
        path = d / "run.yaml"
        content = rng.choice([None, b"steps: [", b"- 1\n", b"42\n", b"\xff\xfe\x01", b"nope: 1\n",
                              b"steps: [1, 2]\n", b"steps: {a: 1}\n", b"steps: true\n", b"learning_rate: .nan\n",
                              b"min_win_rate: 3\n"])
        if content is not None:
            path.write_bytes(content)
        case = self.case("bad --params-file", "--params-file", str(path), *self.with_required())
        case.note = f"params file: {content!r}"
        return case

    def bad_flag(self, rng, d: Path) -> BadInput:
        flag, value = rng.choice([("--timeout", "abc"), ("--timeout", "1.5"), ("--no-such-flag", "1"),
                                  ("--param", None), ("--wait", "yes")])
        extra = [flag] if value is None else [flag, value]
        return self.case("bad flag", *self.with_required(), *extra)


def part_bad_inputs(lab: Lab, results: list[Case], total: int, seed: int) -> None:
    rng = random.Random(seed)
    shared = lab.folder("inputs-shared")
    host = CountingPort()
    evaluate = EvaluateInputs(lab, shared)
    generators = {  # command: (families, share of the cases)
        "prepare": (PrepareInputs(lab).families(), 0.55),
        "evaluate": (evaluate.families(), 0.12),
        "register": (RegisterInputs(lab, evaluate).families(), 0.18),
        "pipeline submit": (PipelineInputs(host).families(), 0.15),
    }
    for command, (families, share) in generators.items():
        count = round(total * share)
        for index in range(count):
            family = families[index % len(families)]  # every family gets its share; the inputs vary by seed
            folder = lab.folder("inputs")
            bad = family(rng, folder)
            run_case(results, f"(c) bad inputs: {command}", bad.family, lambda: judge(bad, folder))
            if index % 50 == 49:
                shutil.rmtree(lab.work / "inputs", ignore_errors=True)  # keep the scratch folder small


# -- (f) no pickle


def part_pickle(results: list[Case]) -> None:
    from test_package import PACKAGE, pickle_risks

    def scan() -> str:
        files = sorted(PACKAGE.rglob("*.py"))
        risks = [risk for path in files for risk in pickle_risks(path)]
        expect(not risks, f"{len(risks)} pickle risks", "\n".join(risks))
        return f"no pickle load in {len(files)} files"

    run_case(results, "(f) pickle loads in sspo/", "AST scan of tests/test_package.py", scan)


# -- the campaign


def build_toy(work: Path) -> tuple[str, str]:
    """A minimal toy world, base model and prepared data (the campaign tests failure paths, not quality)."""
    from sspo import config
    from sspo.stages import run_bootstrap, run_prepare, run_world

    world, base, data = str(work / "world"), str(work / "base"), str(work / "prepared")
    run_world(config.load("world", None, {"output": world, "samples_per_scene": 1}))
    run_bootstrap(config.load("bootstrap", None, {"world": world, "output": base, "vae_steps": 5, "unet_steps": 5}))
    run_prepare(config.load("prepare", None, {"source": world, "output": data}))
    return base, data


def table(results: list[Case]) -> str:
    rows = ["| part | cases | outcomes | failed |", "|---|---:|---|---:|"]
    for part in dict.fromkeys(case.part for case in results):
        cases = [case for case in results if case.part == part]
        outcomes = Counter(re.sub(r" \(\d+ faults injected\)", "", case.outcome) for case in cases
                           if not case.failure)
        shown = "; ".join(f"{outcome}: {count}" for outcome, count in outcomes.most_common())
        failed = sum(1 for case in cases if case.failure)
        rows.append(f"| {part} | {len(cases)} | {shown} | {failed} |")
    return "\n".join(rows)


def generator_table(results: list[Case]) -> str:
    """Outcome counts per bad-input generator."""
    rows = ["| command | generator | cases | outcomes | failed |", "|---|---|---:|---|---:|"]
    for part in dict.fromkeys(case.part for case in results if case.part.startswith("(c)")):
        cases = [case for case in results if case.part == part]
        for family in sorted(dict.fromkeys(case.name for case in cases)):
            mine = [case for case in cases if case.name == family]
            outcomes = Counter(case.outcome for case in mine if not case.failure)
            shown = "; ".join(f"{outcome}: {count}" for outcome, count in outcomes.most_common())
            rows.append(f"| {part.removeprefix('(c) bad inputs: ')} | {family} | {len(mine)} | {shown} | "
                        f"{sum(1 for case in mine if case.failure)} |")
    return "\n".join(rows)


def failures(results: list[Case]) -> str:
    failed = [case for case in results if case.failure]
    lines = []
    for case in failed:
        lines.append(f"FAILED {case.part} / {case.name}: {case.failure}")
        lines += [f"    {line}" for line in case.detail.splitlines()]
    return "\n".join(lines)


def run_campaign(lab: Lab, quick: bool, seed: int, bad_inputs: int) -> list[Case]:
    results: list[Case] = []
    part_kills(lab, results, QUICK_KILLS if quick else list(range(len(KILLS))))
    part_s3(lab, results, quick)
    part_bad_inputs(lab, results, bad_inputs, seed)
    part_nan(lab, results, quick)
    part_corrupt(lab, results, quick)
    part_pickle(results)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases of each part (under 2 minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bad-input generator")
    parser.add_argument("--bad-inputs", type=int, default=0, help="bad inputs to generate (default 1100, quick 300)")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    # before torch is imported: the campaign shares a small machine, and nothing may be downloaded
    for name, value in (("OMP_NUM_THREADS", "1"), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    bad_inputs = args.bad_inputs or (300 if args.quick else 1100)
    started = time.monotonic()
    capture_logs_per_case()
    with contextlib.ExitStack() as stack:
        work = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="sspo-faults-")))
        work.mkdir(parents=True, exist_ok=True)
        print("building the toy world, base model and data ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stderr(io.StringIO()):
            base, data = build_toy(work)
        s3 = S3Server()
        s3.start()
        stack.callback(s3.stop)
        lab = Lab(work, base, data, s3)
        stack.enter_context(lab.environment())
        s3.ensure_bucket()
        lab.make_straight_run()
        results = run_campaign(lab, args.quick, args.seed, bad_inputs)
        lab.proxy.stop()
    minutes = (time.monotonic() - started) / 60
    print(f"SSPO fault campaign ({'quick' if args.quick else 'full'}, seed {args.seed}): {len(results)} cases, "
          f"{sum(1 for c in results if c.failure)} failed, {minutes:.1f} min\n")
    print(table(results))
    print("\nBad inputs by generator:\n")
    print(generator_table(results))
    if any(case.failure for case in results):
        print("\n" + failures(results))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
