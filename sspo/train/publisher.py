"""Checkpoints written and published off the training path.

`Trainer.save` hands a checkpoint to the run's `CheckpointPublisher`: with `background` (the `async_checkpoint`
knob) the step pays only for a snapshot of the state in CPU memory (`cpu_snapshot`), and a worker thread writes the
files to the run's local staging folder and publishes them (`RunStore.publish_checkpoint`: run files first, the
manifest last). At most one checkpoint is in flight: the next save waits for it, so host memory holds one snapshot
at most. A failure of the worker is raised in the training thread (`check`, `wait`) as one SSPOError line; what was
published before stays published, and a resume only ever sees checkpoints whose manifest exists. Without
`background` the same work runs inline, as a synchronous save.

Only the main process publishes. The others `follow` its saves: a replay of the checkpoint in flight waits, in them,
until it is published (they cannot see the main process's disk).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sspo import faults, storage, telemetry
from sspo.errors import SSPOError
from sspo.run_store import RunStore

log = logging.getLogger(__name__)


def cpu_snapshot(value):
    """`value` (nested dicts, lists and tuples of tensors and plain values) with every tensor a detached copy in CPU
    memory, so that training can go on changing the originals while the copy is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_snapshot(item) for item in value)
    return copy.deepcopy(value)


@dataclass
class InFlight:
    step: int
    staging: Path
    staged: bool = False  # its files are written in `staging`
    written: threading.Event = field(default_factory=threading.Event)  # the write ended (staged or failed)
    finished: threading.Event = field(default_factory=threading.Event)  # published, or failed


class CheckpointPublisher:
    """A run's checkpoints on their way to its store, one at a time; `last_published` is the run's latest published
    checkpoint when it starts (what a failure names as kept)."""

    def __init__(self, store: RunStore, background: bool, last_published: str | None):
        self.store = store
        self.background = background
        self.last_published = last_published
        self.lock = threading.Lock()
        self.current: InFlight | None = None  # the main process's checkpoint being written or published
        self.followed: int | None = None  # other processes: the step of the main process's latest save
        self.failure: BaseException | None = None
        self.failure_raised = False
        self.publish_seconds = 0.0  # totals of this process, for the run's summary
        self.wait_seconds = 0.0

    def submit(self, step: int, write: Callable[[Path], None]) -> None:
        """Write the checkpoint of `step` with `write(staging folder)` and publish it; call `wait` first. In the
        background, what `write` reads must be a snapshot that training does not change."""
        job = InFlight(step, self.store.checkpoint_staging(step))
        with self.lock:
            self.current = job
        if self.background:
            threading.Thread(target=self._publish, args=(job, write), name=f"checkpoint-publish-{step}",
                             daemon=True).start()  # a daemon: a second interrupt may abandon it (manifest last)
        else:
            started = time.perf_counter()
            self._publish(job, write)
            self._waited(job, started)
            self.check()

    def wait(self) -> None:
        """Wait until the checkpoint in flight is published (the time a step is held up by checkpointing), then
        raise its failure, if any."""
        job = self.current
        if job is not None:
            started = time.perf_counter()
            job.finished.wait()
            self._waited(job, started)
        self.check()

    def check(self) -> None:
        """Raise the failure of a checkpoint written or published in the background, without waiting."""
        if self.failure is not None:
            self.failure_raised = True
            raise self.failure

    def close(self) -> None:
        """For a run that stops on another error: publish what is in flight first (it holds good weights), and
        log its failure instead of raising it over that error."""
        job = self.current
        if job is not None:
            if not job.finished.is_set():
                log.info("publishing checkpoint %s before stopping", self.store.checkpoint_url(job.step))
            job.finished.wait()
            self._release(job)
        if self.failure is not None and not self.failure_raised:
            self.failure_raised = True
            log.warning("%s", self.failure)

    def follow(self, step: int) -> None:
        """Another process than the main one: the main process publishes the checkpoint of `step`."""
        with self.lock:
            self.followed = step

    def local_copy(self, entry: str) -> Path | None:
        """The local staging folder of the replay pool entry `entry` while it is the checkpoint in flight, once its
        files are written: replay reads it there instead of waiting for the upload (a remote run's staging is
        removed once published: then read the published checkpoint). None for any other entry. In the other
        processes, a replay of the checkpoint in flight waits until it is published."""
        with self.lock:
            job, followed = self.current, self.followed
        if job is not None and entry == self.store.pool_entry(job.step):
            job.written.wait()
            if not job.staged:
                self.check()
            return job.staging
        if followed is not None and entry == self.store.pool_entry(followed):
            self._wait_published(self.store.checkpoint_url(followed))
            with self.lock:
                if self.followed == followed:
                    self.followed = None
        return None

    def _publish(self, job: InFlight, write: Callable[[Path], None]) -> None:
        started = time.perf_counter()
        try:
            write(job.staging)
            job.staged = True
            job.written.set()
            faults.point("checkpoint-written")
            url = self.store.publish_checkpoint(job.step)
        except Exception as err:  # carried to the training thread, which raises it
            self.failure = self._stopped_by(job.step, err)
            job.written.set()
            job.finished.set()
            return
        seconds = time.perf_counter() - started
        telemetry.checkpoint_publish_seconds.observe(seconds)
        self.publish_seconds += seconds
        self.last_published = url
        job.finished.set()

    def _stopped_by(self, step: int, err: Exception) -> BaseException:
        """The one-line error that stops the run when the checkpoint of `step` could not be written or published
        (storage and file errors); any other exception is a bug and keeps its traceback."""
        if not isinstance(err, (SSPOError, OSError)):
            return err
        reason = f"access denied: {err}" if isinstance(err, PermissionError) else str(err)
        kept = (f"the last published checkpoint is {self.last_published}" if self.last_published
                else "no checkpoint was published")
        error = SSPOError(f"training stopped: checkpoint {self.store.checkpoint_url(step)} could not be written or "
                          f"published: {' '.join(reason.split())}; {kept}")
        error.__cause__ = err
        return error

    def _release(self, job: InFlight) -> None:
        with self.lock:
            if self.current is job:
                self.current = None

    def _waited(self, job: InFlight, started: float) -> None:
        """`job` is done; the training thread was held up by it since `started`."""
        self._release(job)
        seconds = time.perf_counter() - started
        self.wait_seconds += seconds
        telemetry.checkpoint_wait_seconds.observe(seconds)

    @staticmethod
    def _wait_published(url: str) -> None:
        delay = 0.05
        if not storage.is_published(url):
            log.info("waiting for the main process to publish %s", url)
            while not storage.is_published(url):
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
