"""The checkpoint registry: named, immutable, versioned checkpoints with lineage, and movable aliases, in any
storage URL (s3://bucket/registry, a local folder, ...).

Layout under a registry root:

    <root>/<name>/versions/<version>/     unet.safetensors, checkpoint.json, lineage.json, manifest.json
    <root>/<name>/aliases/<alias>.json    {"name", "alias", "version", "url", "updated_at", "previous", "change"}
    <root>/<name>/aliases/<alias>.history/<change>.json   one object per change, never overwritten
    <root>/<name>/exports/<version>/      the version as a diffusers folder with a model card (the pipeline's export)

A version folder is a checkpoint folder, so its URL works wherever a checkpoint URL does (evaluate --checkpoint,
train --replay-from). Its files are uploaded with conditional creates, read back and checked, and the manifest is
written last with a conditional create: a version is visible only once complete, and of two publishers of one
version exactly one wins. An alias is replaced by a compare-and-swap of the whole object (a PUT conditional on its
ETag on S3, a locked compare and replace in a local folder): of concurrent promotions each either replaces exactly
the version it read, which its record names as `previous`, or reads again and retries; a history object per change
is written once its change is in. An alias object (or the record `sspo register --output` writes) also works as a
checkpoint URL: it points at its version.

A registry in a bucket that does not exist is an error, never an empty registry: nothing creates buckets.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sspo import __version__, storage
from sspo.config import RegisterConfig
from sspo.errors import SSPOError
from sspo.run_store import CHECKPOINT_INFO, CHECKPOINT_WEIGHTS, config_of_checkpoint, resolve_checkpoint

LINEAGE = "lineage.json"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
AUTO_VERSION_TRIES = 5
ALIAS_TRIES = 10  # compare-and-swap attempts of one alias change; each conflict means another promoter got in first


def check_name(kind: str, value: str) -> str:
    if not SAFE_NAME.fullmatch(value or ""):
        raise SSPOError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-' (not first)")
    return value


def model_url(root: str, name: str) -> str:
    return storage.join(root, check_name("model name", name))


def version_url(root: str, name: str, version: str) -> str:
    return storage.join(model_url(root, name), "versions", check_name("version", version))


def export_url(root: str, name: str, version: str) -> str:
    """Where the pipeline exports a version (`sspo export`): beside the versions, never inside one, which is
    immutable."""
    return storage.join(model_url(root, name), "exports", check_name("version", version))


def alias_url(root: str, name: str, alias: str) -> str:
    return storage.join(model_url(root, name), "aliases", f"{check_name('alias', alias)}.json")


def _children(url: str) -> list[str]:
    """Names of the entries directly below `url` (none if it does not exist, as long as its bucket does)."""
    names = storage.list_names(url)
    if names is None:
        storage.require_bucket(url)
        return []
    return names


def _version_order(version: str):
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def list_versions(root: str, name: str) -> list[str]:
    """Complete (published) versions, integers in numeric order first."""
    folders = _children(storage.join(model_url(root, name), "versions"))
    published = [v for v in folders if storage.is_published(version_url(root, name, v))]
    return sorted(published, key=_version_order)


def next_version(root: str, name: str) -> str:
    """One more than the highest integer version folder, complete or not (a failed attempt's number is skipped)."""
    numbers = [int(v) for v in _children(storage.join(model_url(root, name), "versions")) if v.isdigit()]
    return str(max(numbers, default=0) + 1)


def list_aliases(root: str, name: str) -> dict[str, str]:
    aliases = [a.removesuffix(".json") for a in _children(storage.join(model_url(root, name), "aliases"))
               if a.endswith(".json")]
    return {alias: read_alias(root, name, alias)["version"] for alias in aliases}


def read_alias(root: str, name: str, alias: str) -> dict:
    url = alias_url(root, name, alias)
    if not storage.exists(url):
        storage.require_bucket(root)
        raise SSPOError(f"{name} has no alias {alias!r} in {root}")
    return storage.read_json(url)


def resolve_version(root: str, name: str, version: str = "", alias: str = "") -> str:
    """The version meant by exactly one of `version` and `alias`; it must be published."""
    if bool(version) == bool(alias):
        raise SSPOError("give exactly one of --version and --alias")
    if alias:
        version = read_alias(root, name, alias)["version"]
    if not storage.is_published(version_url(root, name, version)):
        storage.require_bucket(root)
        raise SSPOError(f"{name} version {version} is not published in {root}")
    return version


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the sspo code: $SSPO_GIT_COMMIT (set in images), else the git checkout it runs from."""
    if os.environ.get("SSPO_GIT_COMMIT"):
        return os.environ["SSPO_GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def data_lineage(data: str) -> dict:
    """The data URI and the sha256 of its manifest (which holds the sha256 of every file): its content hash."""
    manifest = storage.join(data, storage.MANIFEST)
    if not storage.exists(manifest):
        raise SSPOError(f"data {data} has no {storage.MANIFEST}: register needs prepared data to record its hash")
    return {"uri": data, "sha256": hashlib.sha256(storage.read_bytes(manifest)).hexdigest()}


def lineage(cfg: RegisterConfig, checkpoint: str, info: dict) -> dict:
    """What the version was made from (all but the version number). It holds no time, so a retried publish writes
    the same file. A retraining names the checkpoint (e.g. the production version) its weights started from
    (`init_from`; None = the base model, `parent`) and the earlier checkpoints it replayed (`replay_from`)."""
    train_config = config_of_checkpoint(checkpoint)
    return {
        "name": cfg.name,
        "checkpoint": checkpoint,
        "kind": info.get("kind"),
        "step": info.get("step"),
        "objective": info.get("objective"),
        "parent": info.get("base_model"),
        "init_from": (train_config or {}).get("init_from") or None,
        "replay_from": (train_config or {}).get("replay_from") or [],
        "data": data_lineage(cfg.data or info["data"]),
        "code": {"sspo_version": __version__, "git_commit": git_commit()},
        "train_config": train_config,
        "metrics": storage.read_json(cfg.metrics) if cfg.metrics else None,
    }


def check_destinations(cfg: RegisterConfig) -> None:
    """The names and URLs a registration writes, checked before anything is published: a bad alias or output must
    not leave a version behind that nobody asked for."""
    check_name("model name", cfg.name)
    for kind, value in (("version", cfg.version), ("alias", cfg.alias)):
        if value:
            check_name(kind, value)
    for url in filter(None, (cfg.registry, cfg.output)):
        storage.require_writable(url)
        storage.require_bucket(url)
    if cfg.output:
        storage.require_writable_file(cfg.output)


def require_finite_weights(weights_file: Path, checkpoint: str) -> None:
    """A diverged run's NaN or inf weights must never become a version (torch is imported only here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as weights:
            for name in weights.keys():
                if not weights.get_tensor(name).isfinite().all():
                    raise SSPOError(f"{checkpoint}: the weight {name} holds NaN or inf values; a diverged model is "
                                    "not registered")
    except SafetensorError as err:
        raise SSPOError(f"{checkpoint}: {weights_file.name} is not a safetensors file ({err})") from None


def register(cfg: RegisterConfig) -> dict:
    """Publish `cfg.checkpoint` as a new version of `cfg.name` (and point `cfg.alias` at it). Every input (the
    checkpoint, data, metrics) is read and every name checked before the version is published."""
    check_destinations(cfg)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    source = storage.fetch_dir(checkpoint)
    storage.verify_dir(source)
    require_finite_weights(source / CHECKPOINT_WEIGHTS, checkpoint)
    info = json.loads((source / CHECKPOINT_INFO).read_text())
    made_from = lineage(cfg, checkpoint, info)
    with tempfile.TemporaryDirectory(prefix=".sspo-register-") as staging:
        staging = Path(staging)
        for file in (CHECKPOINT_WEIGHTS, CHECKPOINT_INFO):
            shutil.copyfile(source / file, staging / file)
        tries = 1 if cfg.version else AUTO_VERSION_TRIES
        for attempt in range(1, tries + 1):
            version = cfg.version or next_version(cfg.registry, cfg.name)
            (staging / LINEAGE).write_text(json.dumps({**made_from, "version": version}, indent=2, sort_keys=True))
            url = version_url(cfg.registry, cfg.name, version)
            try:
                extra = {"name": cfg.name, "version": version, "published_at": _now()}
                storage.publish_dir(staging, url, extra, exclusive=True, verify=True)
                break
            except storage.PublishConflict as err:
                if attempt == tries:
                    raise SSPOError(f"cannot publish {cfg.name} version {version}: {err}") from None
    result = {"registry": cfg.registry, "name": cfg.name, "version": version, "url": url}
    if cfg.alias:
        set_alias(cfg.registry, cfg.name, cfg.alias, version)
        result["alias"] = cfg.alias
    if cfg.output:
        storage.write_text(cfg.output, json.dumps(result, indent=2) + "\n")
    return result


def set_alias(root: str, name: str, alias: str, version: str) -> dict:
    """Point `alias` at a published version with a compare-and-swap of the alias object, so that `previous` in the
    returned record is the version this change really replaced; then record the change in the alias history.

    When another promoter changes the alias between our read and our write, the write is refused and we read again
    (up to ALIAS_TRIES times, with a short random pause so that promoters do not collide in step).
    """
    resolve_version(root, name, version=version)
    url = alias_url(root, name, alias)
    written: dict[bytes, dict] = {}  # our attempts: a retried write whose first try landed finds itself here
    for attempt in range(1, ALIAS_TRIES + 1):
        try:
            current, token = storage.read_for_update(url)
            if current in written:
                record = written[current]
                break
            change = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
            record = {"name": name, "alias": alias, "version": version, "url": version_url(root, name, version),
                      "updated_at": _now(), "previous": json.loads(current)["version"] if current else None,
                      "change": change}
            payload = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
            written[payload] = record
            storage.write_if_unchanged(url, payload, token)
            break
        except storage.ConcurrentChange:
            if attempt == ALIAS_TRIES:
                raise SSPOError(f"{name} alias {alias!r} in {root} kept changing under {ALIAS_TRIES} attempts to "
                                f"point it at version {version}; try again") from None
            time.sleep(random.uniform(0.01, 0.05) * attempt)
    history = storage.join(model_url(root, name), "aliases", f"{alias}.history", f"{record['change']}.json")
    storage.create_bytes(history, json.dumps(record, sort_keys=True).encode())
    return record


def alias_history(root: str, name: str, alias: str) -> list[dict]:
    """Every change of `alias`, oldest first."""
    folder = storage.join(model_url(root, name), "aliases", f"{check_name('alias', alias)}.history")
    return [storage.read_json(storage.join(folder, change)) for change in _children(folder)]


def pull(root: str, name: str, output: str, version: str = "", alias: str = "") -> dict:
    """Download a version to the local folder `output`, verifying every file's sha256."""
    version = resolve_version(root, name, version, alias)
    destination = Path(output)
    if destination.exists() and any(destination.iterdir()):
        raise SSPOError(f"{output} exists and is not empty; pull into a new folder")
    if destination.exists():
        destination.rmdir()
    url = version_url(root, name, version)
    storage.download_dir(url, destination, require_manifest=True)
    return {"name": name, "version": version, "url": url, "output": str(destination)}
