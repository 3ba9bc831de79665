"""Where trained weights live: checkpoint folders, run folders and pointers to them. Light on purpose (no model
libraries), so the CLI and the registry can resolve checkpoints without importing torch."""

from __future__ import annotations

from sspo import storage
from sspo.errors import SSPOError

CHECKPOINT_WEIGHTS = "unet.safetensors"
CHECKPOINT_INFO = "checkpoint.json"


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
    latest = latest_checkpoint(storage.join(url, "checkpoints"))
    if latest is None:
        raise SSPOError(f"no published checkpoint at {url}")
    return latest


def latest_checkpoint(checkpoints_url: str) -> str | None:
    """The highest-step checkpoint below `checkpoints_url` whose manifest exists (i.e. completely published)."""
    fs, path = storage.filesystem(checkpoints_url)
    if not fs.exists(path):
        return None
    steps = sorted(
        entry.rstrip("/").rsplit("/", 1)[-1]
        for entry in fs.ls(path, detail=False)
        if fs.exists(storage.join(entry, storage.MANIFEST))
    )
    return storage.join(checkpoints_url, steps[-1]) if steps else None
