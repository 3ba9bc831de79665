"""Every input and output is an fsspec URL: a local path, file://, s3:// (endpoint and credentials from the usual
AWS environment variables) or any other protocol fsspec knows.

Directories that other stages trust (datasets, checkpoints) carry a `manifest.json` with the sha256 of every file.
The manifest is written last, with an exclusive create, so a reader never trusts a half-written directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from sspo.errors import SSPOError

MANIFEST = "manifest.json"


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def local_path(url: str) -> Path:
    return Path(str(url).removeprefix("file://"))


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def filesystem(url: str):
    try:
        return url_to_fs(str(url))
    except (ImportError, ValueError) as err:
        raise SSPOError(f"cannot open {url}: {err}") from err


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_text(url: str) -> str:
    try:
        with fsspec.open(str(url), "r") as f:
            return f.read()
    except FileNotFoundError as err:
        raise SSPOError(f"not found: {url}") from err


def read_json(url: str):
    text = read_text(url)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SSPOError(f"{url} is not valid JSON: {err}") from err


def write_text(url: str, text: str) -> None:
    if is_local(url):
        local_path(url).parent.mkdir(parents=True, exist_ok=True)
    with fsspec.open(str(url), "w") as f:
        f.write(text)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("SSPO_CACHE", Path.home() / ".cache" / "sspo"))


def fetch_dir(url: str) -> Path:
    """A local directory holding the contents of `url`; remote directories are downloaded into the cache once."""
    if is_local(url):
        path = local_path(url)
        if not path.is_dir():
            raise SSPOError(f"not a directory: {url}")
        return path
    fs, remote = filesystem(url)
    if not fs.isdir(remote):
        raise SSPOError(f"not found: {url}")
    dest = cache_root() / "fetched" / hashlib.sha256(str(url).encode()).hexdigest()[:16]
    if (dest / MANIFEST).exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    fs.get(remote.rstrip("/") + "/", str(partial), recursive=True)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def write_manifest(directory: Path, extra: dict | None = None) -> dict:
    """sha256 of every file below `directory`, as the dict that becomes its manifest."""
    files = {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return {"files": files, **(extra or {})}


def verify_dir(directory: Path) -> dict:
    """Check every file against the manifest; returns the manifest."""
    manifest_file = directory / MANIFEST
    if not manifest_file.exists():
        raise SSPOError(f"{directory} has no {MANIFEST}: it is incomplete or was not written by sspo")
    manifest = json.loads(manifest_file.read_text())
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise SSPOError(f"{directory}: {name} is listed in the manifest but missing")
        if sha256_file(path) != entry["sha256"]:
            raise SSPOError(f"{directory}: {name} does not match its sha256 in the manifest (corrupt or tampered)")
    return manifest


def publish_dir(local_dir: Path, url: str, extra: dict | None = None) -> str:
    """Copy `local_dir` to `url`, then write its manifest last with an exclusive create."""
    manifest = write_manifest(local_dir, extra)
    fs, remote = filesystem(url)
    if fs.exists(join(remote, MANIFEST)):
        raise SSPOError(f"{url} already exists; outputs are never overwritten")
    if not (is_local(url) and local_path(url).resolve() == local_dir.resolve()):
        fs.makedirs(remote, exist_ok=True)
        for name in manifest["files"]:
            fs.makedirs(os.path.dirname(join(remote, name)), exist_ok=True)
            fs.put_file(str(local_dir / name), join(remote, name))
    try:
        with fs.open(join(remote, MANIFEST), "xb") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    except FileExistsError as err:
        raise SSPOError(f"{url} was published by another writer at the same time") from err
    return url


@contextlib.contextmanager
def staged_output(url: str, extra: dict | None = None):
    """A local folder to build an output in; published to `url` (manifest last) only if the block succeeds.

    An existing output is never touched: a complete one is refused, and so is a leftover without a manifest.
    """
    fs, remote = filesystem(url)
    if fs.exists(join(remote, MANIFEST)):
        raise SSPOError(f"{url} already exists; outputs are never overwritten (choose another output)")
    if is_local(url) and local_path(url).exists():
        raise SSPOError(f"{url} exists but holds no complete output (no {MANIFEST}); remove it first")
    parent = local_path(url).parent if is_local(url) else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sspo-staging-", dir=parent) as staging:
        staging = Path(staging)
        meta = extra if extra is not None else {}
        yield staging, meta
        if is_local(url):
            staging.rename(local_path(url))
            staging.mkdir()  # TemporaryDirectory removes its folder on exit
            publish_dir(local_path(url), url, meta)
        else:
            publish_dir(staging, url, meta)
