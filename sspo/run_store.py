"""A training run's folder and where trained weights live: the one module that knows a run's layout. Light on
purpose (no model libraries), so the CLI and the registry can resolve checkpoints without importing torch.

    <run>/config.json                      the resolved train config
    <run>/train_log.jsonl                  one JSON row per optimizer step
    <run>/train_log.json                   the same rows as one JSON array (the format `dvc plots` reads)
    <run>/metrics.json                     the final summary, written when the run ends
    <run>/checkpoints/step-NNNNNNN/        unet.safetensors, checkpoint.json, ... and manifest.json, written last

A run's files are built in a local folder (the run itself for a local output, a folder in the cache for a remote
one). For a remote output they are uploaded at every checkpoint, before that checkpoint is published, so a retried
pod finds a log that reaches at least its latest checkpoint; a published checkpoint's local staging is removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from sspo import faults, storage
from sspo.errors import SSPOError

CHECKPOINT_WEIGHTS = "unet.safetensors"
CHECKPOINT_INFO = "checkpoint.json"
CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
TRAIN_LOG = "train_log.jsonl"
TRAIN_LOG_ARRAY = "train_log.json"
METRICS = "metrics.json"
RUN_FILES = (CONFIG, TRAIN_LOG, TRAIN_LOG_ARRAY)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def run_of_checkpoint(checkpoint: str) -> str:
    """The run folder a checkpoint of a run was saved in (<run>/checkpoints/step-NNNNNNN)."""
    return storage.parent(storage.parent(checkpoint))


def latest_checkpoint(run_url: str) -> str | None:
    """The highest-step checkpoint of the run whose manifest exists (i.e. completely published)."""
    checkpoints_url = storage.join(run_url, CHECKPOINTS)
    published = [name for name in storage.list_names(checkpoints_url) or []
                 if name.startswith("step-") and storage.is_published(storage.join(checkpoints_url, name))]
    return storage.join(checkpoints_url, published[-1]) if published else None


def resolve_checkpoint(url: str) -> str:
    """A checkpoint URL (a registry version folder is one), a run folder whose latest published checkpoint is
    meant, or a .json pointer with a "url" (a registry alias object, or the record `sspo register` writes)."""
    if str(url).split("?")[0].endswith(".json"):
        pointer = storage.read_json(url)
        if not isinstance(pointer, dict) or "url" not in pointer:
            raise SSPOError(f"{url} is not a checkpoint pointer (a JSON object with a \"url\")")
        return resolve_checkpoint(pointer["url"])
    if storage.exists(storage.join(url, CHECKPOINT_INFO)):
        return url
    latest = latest_checkpoint(url)
    if latest is None:
        raise SSPOError(f"no published checkpoint at {url}")
    return latest


def config_of_checkpoint(checkpoint: str) -> dict | None:
    """The train config of the run a checkpoint was saved in (None for a checkpoint outside a run)."""
    config_url = storage.join(run_of_checkpoint(checkpoint), CONFIG)
    return storage.read_json(config_url) if storage.exists(config_url) else None


def is_finished(url: str) -> bool:
    """Whether the run at `url` ran to its last step (its final metrics are written then)."""
    return storage.exists(storage.join(url, METRICS))


def parse_log(text: str, where: str) -> list[dict]:
    """Rows of a training log. A last line cut short (the process was killed while appending it) is dropped: a
    resume cuts the log back to its checkpoint, before that step, anyway."""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise SSPOError(f"{where}: line {number} is not a JSON row; the log is damaged") from None
    return rows


def read_log(url: str) -> list[dict]:
    """The rows of a run's training log (empty when the run has none yet)."""
    log_url = storage.join(url, TRAIN_LOG)
    if not storage.exists(log_url):
        return []
    return parse_log(storage.read_text(log_url), log_url)


@contextmanager
def checkpoint_files(url: str):
    """A local, verified copy of a published checkpoint for the duration of the block. A remote one is downloaded
    to a temporary folder and removed afterwards (its optimizer state is as large as the model, twice)."""
    if storage.is_local(url):
        directory = storage.local_path(url)
        storage.verify_dir(directory)
        yield directory
        return
    cache = storage.cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sspo-checkpoint-", dir=cache) as folder:
        yield storage.download_dir(url, Path(folder) / "checkpoint", require_manifest=True)


class RunStore:
    """One training run: its URL, its local staging folder, its checkpoints, log, metrics and config."""

    def __init__(self, url: str):
        storage.require_writable(url)
        self.url = url
        self.remote = not storage.is_local(url)
        if self.remote:
            key = hashlib.sha256(url.encode()).hexdigest()[:16]
            self.local = storage.cache_root() / "runs" / key
        else:
            self.local = storage.local_path(url)

    def checkpoint_url(self, step: int) -> str:
        return storage.join(self.url, CHECKPOINTS, checkpoint_name(step))

    @staticmethod
    def pool_entry(step: int) -> str:
        """How the replay pool records this run's own checkpoint: relative to the run, so a moved or copied run
        replays its own checkpoints (entries from elsewhere are recorded as absolute URLs)."""
        return f"{CHECKPOINTS}/{checkpoint_name(step)}"

    def entry_url(self, entry: str) -> str:
        """The checkpoint URL of a replay pool entry."""
        if "://" in entry or Path(entry).is_absolute():
            return entry
        return storage.join(self.url, entry)

    def latest_checkpoint(self) -> str | None:
        return latest_checkpoint(self.url)

    def write_config(self, config_json: str) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        (self.local / CONFIG).write_text(config_json)

    def start_log(self, resume_step: int) -> list[dict]:
        """The log as it was at `resume_step`: rows a crashed attempt wrote after its last checkpoint are dropped,
        so every step is logged exactly once. A remote run reads its uploaded log (a retried pod has no local one).
        Returns the rows kept."""
        rows = read_log(self.url) if self.remote else self._local_rows()
        kept = [row for row in rows if row["step"] <= resume_step]
        self.local.mkdir(parents=True, exist_ok=True)
        (self.local / TRAIN_LOG).write_text("".join(json.dumps(row) + "\n" for row in kept))
        return kept

    def _local_rows(self) -> list[dict]:
        path = self.local / TRAIN_LOG
        return parse_log(path.read_text(), str(path)) if path.exists() else []

    def append_log(self, row: dict) -> None:
        with open(self.local / TRAIN_LOG, "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint_staging(self, step: int) -> Path:
        return self.local / CHECKPOINTS / checkpoint_name(step)

    def publish_checkpoint(self, step: int) -> str:
        """Sync the run files, then publish the checkpoint staged for `step` (manifest last); a remote run's
        staging is removed once published."""
        self._sync_run_files()
        faults.point("run-files-synced")  # crash windows for the fault tests (sspo.faults)
        url = self.checkpoint_url(step)
        staging = self.checkpoint_staging(step)
        storage.publish_dir(staging, url)
        faults.point("checkpoint-published")
        if self.remote:
            shutil.rmtree(staging)
        return url

    def finish(self, metrics: dict) -> None:
        (self.local / METRICS).write_text(json.dumps(metrics, indent=2))
        self._sync_run_files(METRICS)

    def _sync_run_files(self, *extra: str) -> None:
        rows = self._local_rows()
        (self.local / TRAIN_LOG_ARRAY).write_text(json.dumps(rows))
        if self.remote:
            storage.upload_files(self.local, self.url, [*RUN_FILES, *extra])
