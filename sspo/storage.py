"""Every input and output is an fsspec URL: a local path, file://, s3:// (endpoint and credentials from the usual
AWS environment variables), DVC-tracked data at a git revision, or any other protocol fsspec knows.

DVC-tracked paths use the form `dvc://<path in the repo>?repo=<git URL or local dir>&rev=<git revision>`; `repo`
defaults to the current directory and `rev` to its working tree. They are read-only, and are read through DVC's
fsspec filesystem, which takes the data from the repository's DVC cache or its default remote.

Directories that other stages trust (datasets, checkpoints) carry a `manifest.json` with the sha256 of every file.
The manifest is written last, with a conditional create, so a reader never trusts a half-written directory, and of
two writers of one directory only one succeeds. Transient storage errors (lost connections, timeouts, 5xx and
throttling answers) are retried with exponential backoff a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from sspo import faults
from sspo.errors import SSPOError

MANIFEST = "manifest.json"
DVC_SCHEME = "dvc://"
# Attempts and first back-off delay for transient storage errors; the delay doubles after each failed attempt.
RETRY_ATTEMPTS_ENV = "SSPO_STORAGE_ATTEMPTS"
RETRY_DELAY_ENV = "SSPO_STORAGE_RETRY_DELAY"
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EPIPE, errno.EREMOTEIO}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "ServiceUnavailable", "InternalError", "503", "500"}

log = logging.getLogger(__name__)


class PublishConflict(SSPOError):
    """Another writer published (or is publishing) the same URL."""


class ConcurrentChange(SSPOError):
    """Another writer changed an object between our reading it and our conditional write of it."""


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def is_dvc(url: str) -> bool:
    return str(url).startswith(DVC_SCHEME)


def local_path(url: str) -> Path:
    return Path(str(url).removeprefix("file://"))


def join(url: str, *parts: str) -> str:
    """`url` with path parts appended (before the query of a dvc:// URL)."""
    base, separator, query = str(url).partition("?") if is_dvc(url) else (str(url), "", "")
    return "/".join([base.rstrip("/"), *parts]) + separator + query


def parent(url: str) -> str:
    """The folder that holds `url`."""
    base, separator, query = str(url).partition("?") if is_dvc(url) else (str(url), "", "")
    return base.rstrip("/").rsplit("/", 1)[0] + separator + query


def absolute(url: str) -> str:
    """`url` independent of the current folder: local paths (and a dvc:// URL's local repository) made absolute."""
    if is_dvc(url):
        path, repo, rev = parse_dvc_url(url)
        return dvc_url(path, repo, rev or "")
    if is_local(url):
        return str(local_path(url).absolute())
    return str(url)


def dvc_url(path: str, repo: str = "", rev: str = "") -> str:
    query = "&".join(f"{key}={value}" for key, value in (("repo", repo), ("rev", rev)) if value)
    return f"{DVC_SCHEME}{path.strip('/')}" + (f"?{query}" if query else "")


def parse_dvc_url(url: str) -> tuple[str, str, str | None]:
    """(path in the repo, repo, rev) of a dvc:// URL."""
    parts = urlsplit(str(url))
    path = (parts.netloc + parts.path).strip("/")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"repo", "rev"})
    if not path or unknown:
        raise SSPOError(f"bad DVC URL {url}: use dvc://<path in the repo>?repo=<git URL or dir>&rev=<revision>")
    repo = query.get("repo", ["."])[0]
    if "://" not in repo and not repo.startswith("git@"):
        repo = os.path.abspath(repo)
    return path, repo, query.get("rev", [None])[0]


@functools.lru_cache(maxsize=8)
def dvc_filesystem(repo: str, rev: str | None):
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    try:
        fs = DVCFileSystem(repo, rev=rev)
        fs.repo.get_rev()  # opens the repository and resolves the revision now, not on first read
        return fs
    except DvcException as err:
        raise SSPOError(f"cannot open the DVC repository {repo} at {rev or 'its working tree'}: {err}") from None


def filesystem(url: str):
    if is_dvc(url):
        path, repo, rev = parse_dvc_url(url)
        return dvc_filesystem(repo, rev), path
    try:
        fs, path = url_to_fs(str(url))
    except (ImportError, ValueError) as err:
        raise SSPOError(f"cannot open {url}: {err}") from err
    if getattr(fs, "async_impl", False):
        ignore_orphaned_body_writers(fs.loop)
    return fs, path


def ignore_orphaned_body_writers(loop) -> None:
    """Keep aiohttp's orphaned request-body writers out of the error output of fsspec's I/O loop.

    For an upload aiohttp writes the body in a task of its own (`ClientRequest.write_bytes`). When the connection
    drops before that task starts (a pooled connection the server closed), the task fails and closes the connection,
    the request then fails on its response side and is retried or reported through sspo's retry, and nobody awaits
    the writer: when it is collected asyncio logs "Task exception was never retrieved" with a traceback, once per
    such request. Only those tasks, and only with connection errors, are dropped here (at debug level); everything
    else reaches the handler that was there before, or asyncio's default one.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "ignores_orphaned_body_writers", False):
        return

    def handler(loop, context):
        from aiohttp import ClientConnectionError

        task, error = context.get("future"), context.get("exception")
        coroutine = task.get_coro() if isinstance(task, asyncio.Task) else None
        if (getattr(coroutine, "__qualname__", "") == "ClientRequest.write_bytes"
                and isinstance(error, (ClientConnectionError, OSError))):
            log.debug("ignored the failed body writer of a request that failed on its own: %r", error)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.ignores_orphaned_body_writers = True
    loop.set_exception_handler(handler)


def require_writable(url: str) -> None:
    if is_dvc(url):
        raise SSPOError(f"{url}: dvc:// URLs are read-only; write to a path or s3:// URL and track it with DVC")


def is_s3(fs) -> bool:
    return "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)


def require_writable_file(url: str) -> None:
    """A local file path that a file can be written to (checked before work that must not be wasted): not a folder,
    below folders only, each name short enough."""
    if not is_local(url):
        return
    path = local_path(url).absolute()
    if path.is_dir():
        raise SSPOError(f"{url} is a folder; give the path of a file")
    too_long = [part for part in path.parts if len(part.encode()) > 255]
    if too_long:
        raise SSPOError(f"{url}: the name {too_long[0][:40]}... is longer than 255 bytes")
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        raise SSPOError(f"{url}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise SSPOError(f"{url}: {existing} is not writable")


def require_bucket(url: str) -> None:
    """The bucket of an s3:// URL must exist: a mistyped bucket is an error, never an empty store or a new bucket."""
    fs, path = filesystem(url)
    if not is_s3(fs):
        return
    from botocore.exceptions import ParamValidationError

    bucket = path.split("/", 1)[0]
    try:
        retry(lambda: fs.call_s3("head_bucket", Bucket=bucket), f"checking the bucket of {url}")
    except FileNotFoundError:
        raise SSPOError(f"{url}: the bucket {bucket!r} does not exist") from None
    except ParamValidationError:
        raise SSPOError(f"{url}: {bucket!r} is not a bucket name; use s3://<bucket>/<path>") from None


def is_transient(err: BaseException) -> bool:
    """Lost connections, timeouts, 5xx and throttling answers: worth another attempt."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(err, ClientError):
        response = err.response or {}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or response.get("Error", {}).get("Code") in TRANSIENT_CODES
    if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
        return True
    # s3fs turns a ClientError into an OSError whose cause is the original answer
    return err.__cause__ is not None and is_transient(err.__cause__)


def credentials_problem(err: BaseException) -> str | None:
    """What is wrong with the credentials when `err` says access was refused or impossible; None otherwise."""
    from botocore.exceptions import NoCredentialsError

    if isinstance(err, PermissionError):
        return f"access denied ({err}); check the credentials and permissions for it"
    if isinstance(err, NoCredentialsError):
        return f"{err}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    return None


def retry(action, what: str):
    """`action()`, retried with exponential backoff (and jitter) while it fails with a transient error. A refused
    access (wrong or missing credentials, a bucket policy) is reported in one line that names `what` was tried."""
    attempts = max(1, int(os.environ.get(RETRY_ATTEMPTS_ENV, "5")))
    delay = float(os.environ.get(RETRY_DELAY_ENV, "0.5"))
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as err:
            if problem := credentials_problem(err):
                raise SSPOError(f"{what}: {problem}") from err
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise SSPOError(f"{what} failed after {attempts} attempts: {err}") from err
            wait = min(delay * 2 ** (attempt - 1), 30.0) * random.uniform(0.5, 1.0)
            log.warning("%s failed (%s); attempt %d of %d in %.1f s", what, err, attempt + 1, attempts, wait)
            time.sleep(wait)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(lambda: fs.exists(path), f"checking {url}")


def list_names(url: str) -> list[str] | None:
    """Sorted names of the entries directly below the folder `url`, freshly listed; None when it does not exist."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    if not retry(lambda: fs.exists(path), f"checking {url}"):
        return None
    entries = retry(lambda: fs.ls(path, detail=False), f"listing {url}")
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)


def is_published(url: str) -> bool:
    """Whether the folder at `url` is complete: its manifest, written last, exists."""
    return exists(join(url, MANIFEST))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return retry(lambda: fs.cat_file(path), f"reading {url}")
    except FileNotFoundError as err:
        raise SSPOError(f"not found: {url}") from err


def read_text(url: str) -> str:
    try:
        return read_bytes(url).decode()
    except UnicodeDecodeError as err:
        raise SSPOError(f"{url} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None


def read_json(url: str):
    text = read_text(url)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SSPOError(f"{url} is not valid JSON: {err}") from err


def write_text(url: str, text: str) -> None:
    """Write (or replace) a small object whole: a single PUT, or locally a renamed temporary file. A local path
    that is a link, a device or a pipe is written through, not replaced."""
    require_writable(url)
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink() and (target.is_file() or not target.exists()):
            staged = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
            staged.write_text(text)
            os.replace(staged, target)
            return
    retry(lambda: fs.pipe_file(path, text.encode()), f"writing {url}")


def create_file(fs, local_file: Path, remote: str) -> bool:
    """Upload `local_file` only if `remote` does not exist yet; False when it did. The object appears whole."""
    if isinstance(fs, LocalFileSystem):
        Path(remote).parent.mkdir(parents=True, exist_ok=True)
        staged = Path(remote).with_name(f".{Path(remote).name}.{uuid.uuid4().hex}.partial")
        try:
            shutil.copyfile(local_file, staged)
            os.link(staged, remote)  # atomic, and fails if the name exists
        except FileExistsError:
            return False
        finally:
            staged.unlink(missing_ok=True)
        return True
    try:
        fs.put_file(str(local_file), remote, mode="create")
    except FileExistsError:
        return False
    except NotImplementedError:
        raise SSPOError(f"{remote}: this storage cannot create a file only where none exists, which publishing "
                        "needs; use a local path or s3://") from None
    return True


def create_bytes(url: str, data: bytes) -> bool:
    """Create the object at `url` holding `data` unless it exists; False when it did."""
    require_writable(url)
    fs, path = filesystem(url)
    with tempfile.NamedTemporaryFile() as staged:
        staged.write(data)
        staged.flush()
        return retry(lambda: create_file(fs, Path(staged.name), path), f"creating {url}")


def read_for_update(url: str) -> tuple[bytes | None, str | None]:
    """The object at `url` (None when there is none) and a token naming this state of it for `write_if_unchanged`:
    its S3 ETag, else its sha256. ConcurrentChange when it changes while being read."""
    fs, path = filesystem(url)
    if is_s3(fs):
        from s3fs.utils import FileExpired

        def read():
            fs.invalidate_cache(path)
            try:
                with fs.open(path, "rb") as f:  # its reads are conditional on the ETag it reports
                    return f.read(), f.details["ETag"]
            except FileNotFoundError:
                return None, None
            except FileExpired:  # not retried (it would be, as EBUSY): it means read again for a new token
                raise ConcurrentChange(f"{url} changed while it was read") from None

        return retry(read, f"reading {url}")

    def read():
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    data = retry(read, f"reading {url}")
    return data, None if data is None else hashlib.sha256(data).hexdigest()


def write_if_unchanged(url: str, data: bytes, token: str | None) -> None:
    """Replace the object at `url` with `data` only if it is still in the state `token` names (None: absent), as
    `read_for_update` returned it; ConcurrentChange when another writer changed it in between.

    On S3 a PUT conditional on the ETag (If-Match, or If-None-Match: * for a new object); in a local folder the
    comparison and an atomic replace under an exclusive flock (released even when the holder dies). Other stores
    have no conditional write: there the last writer wins.
    """
    require_writable(url)
    fs, path = filesystem(url)
    if is_s3(fs):
        condition = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
        try:
            retry(lambda: fs.pipe_file(path, data, **condition), f"writing {url}")
        except OSError as err:
            if not is_precondition_failure(err):
                raise
            raise ConcurrentChange(f"{url} was changed by another writer") from None
    elif isinstance(fs, LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f".{target.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = hashlib.sha256(target.read_bytes()).hexdigest() if target.exists() else None
            if current != token:
                raise ConcurrentChange(f"{url} was changed by another writer")
            staged = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
            staged.write_bytes(data)
            os.replace(staged, target)  # readers see the old object or the new one, never a part
    else:
        retry(lambda: fs.pipe_file(path, data), f"writing {url}")


def is_precondition_failure(err: BaseException) -> bool:
    """S3 refused a conditional write: the object is not in the state the condition named (412), or another
    conditional write to it was in progress (409)."""
    from botocore.exceptions import ClientError

    if isinstance(err, FileExistsError):  # s3fs's name for a failed If-None-Match
        return True
    cause = err.__cause__
    if not isinstance(cause, ClientError):
        return False
    response = cause.response or {}
    return (response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remote_digest(fs, path: str) -> tuple[str, int]:
    """(sha256, bytes) of a stored object, read back from the store."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def cache_root() -> Path:
    return Path(os.environ.get("SSPO_CACHE", Path.home() / ".cache" / "sspo"))


def download_dir(url: str, dest: Path, require_manifest: bool = False) -> Path:
    """Download the folder at `url` to the new local folder `dest`, verified against its manifest when it has one.

    The files land in a sibling staging folder first, so `dest` appears only once complete and verified.
    """
    fs, remote = filesystem(url)
    if not retry(lambda: fs.isdir(remote), f"checking {url}"):
        raise SSPOError(f"not found: {url}")
    partial = dest.with_name(f".{dest.name}.partial")
    dest.parent.mkdir(parents=True, exist_ok=True)

    def get():
        shutil.rmtree(partial, ignore_errors=True)
        fs.get(remote.rstrip("/") + "/", str(partial), recursive=True)

    try:
        retry(get, f"downloading {url}")
        if require_manifest or (partial / MANIFEST).exists():
            try:
                verify_dir(partial)
            except SSPOError as err:
                raise SSPOError(f"refusing {url}: {str(err).replace(str(partial), 'the download')}") from None
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def fetch_dir(url: str) -> Path:
    """A local directory holding the contents of `url`; remote directories are downloaded into the cache once.

    A remote directory with a manifest is verified on download and then served from the cache; one without is
    downloaded again each time, since nothing says it is complete.
    """
    if is_local(url):
        path = local_path(url)
        if not path.is_dir():
            raise SSPOError(f"not a directory: {url}")
        return path
    key, cacheable = str(url), True
    if is_dvc(url):
        path, repo, rev = parse_dvc_url(url)
        cacheable = rev is not None  # a working tree changes under the same URL
        if cacheable:
            key = dvc_url(path, repo, dvc_filesystem(repo, rev).repo.get_rev())  # a branch is pinned to its commit
    dest = cache_root() / "fetched" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if cacheable and (dest / MANIFEST).exists():
        try:
            verify_dir(dest)  # the cache may have been damaged since it was filled
            return dest
        except SSPOError as err:
            log.warning("%s; downloading %s again", err, url)
    return download_dir(url, dest)


def fetch_file(folder_url: str, name: str) -> Path:
    """A local copy of one file of a published folder, checked against the folder's manifest on every call, so a
    file damaged after publishing is refused instead of used (a damaged cached copy is downloaded again). Only that
    file is downloaded."""
    manifest = read_json(join(folder_url, MANIFEST))
    entry = manifest.get("files", {}).get(name) if isinstance(manifest, dict) else None
    if entry is None:
        raise SSPOError(f"{folder_url}: {name} is not listed in its {MANIFEST}")
    url = join(folder_url, name)
    if is_local(folder_url):
        path = local_path(folder_url) / name
        if not path.exists():
            raise SSPOError(f"{folder_url}: {name} is listed in its {MANIFEST} but missing")
    else:
        path = cache_root() / "files" / entry["sha256"]
        if path.exists() and sha256_file(path) == entry["sha256"]:
            return path
        fs, remote = filesystem(url)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            retry(lambda: fs.get_file(remote, str(partial)), f"downloading {url}")
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
    if sha256_file(path) != entry["sha256"]:
        raise SSPOError(f"{url} does not match its sha256 in the manifest (corrupt or tampered)")
    return path


def upload_files(local_dir: Path, url: str, names: list[str]) -> None:
    """Copy the named files of `local_dir` to the folder `url`, replacing what is there, each upload retried."""
    fs, remote = filesystem(url)
    for name in names:
        retry(lambda: fs.put_file(str(local_dir / name), join(remote, name)), f"uploading {name} to {url}")


@contextlib.contextmanager
def output_folder(url: str):
    """A local folder whose files end up in the folder `url`: the folder itself for a local URL; for a remote one a
    temporary folder, uploaded (each file retried) when the block succeeds. Files are replaced, not versioned."""
    require_writable(url)
    if is_local(url):
        local_path(url).mkdir(parents=True, exist_ok=True)
        yield local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="sspo-output-") as folder:
        yield Path(folder)
        upload_files(Path(folder), url, sorted(p.name for p in Path(folder).iterdir() if p.is_file()))


def save_tensors(tensors: dict, path: Path) -> None:
    """safetensors' save_file, except that a failed write raises OSError like any other file write (a full disk is
    then one line): safetensors reports it as SafetensorError, with the OS error number only in its message."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as err:
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from err


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


def publish_dir(local_dir: Path, url: str, extra: dict | None = None, *, exclusive: bool = False,
                verify: bool = False) -> str:
    """Copy `local_dir` to `url`, then write its manifest last with a conditional create.

    exclusive: every file is created only if absent (an identical file left by an earlier, failed attempt is
    kept), so a concurrent publisher of the same URL can never overwrite a file of the one that wins.
    verify: re-read every uploaded file from the store and check its size and sha256 before the manifest.
    """
    require_writable(url)
    # publish_id makes every manifest unique, so a retried create can tell its own manifest from another writer's
    manifest = write_manifest(local_dir, {**(extra or {}), "publish_id": uuid.uuid4().hex})
    fs, remote = filesystem(url)
    fs.invalidate_cache(remote)
    if retry(lambda: fs.exists(join(remote, MANIFEST)), f"checking {url}"):
        raise PublishConflict(f"{url} already exists; outputs are never overwritten")
    if not (is_local(url) and local_path(url).resolve() == local_dir.resolve()):
        if is_s3(fs):
            require_bucket(url)  # S3 has no folders to create, and s3fs's makedirs would create a missing bucket
        else:
            retry(lambda: fs.makedirs(remote, exist_ok=True), f"creating {url}")
        for name, entry in manifest["files"].items():
            target = join(remote, name)
            if isinstance(fs, LocalFileSystem):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                created = retry(lambda: create_file(fs, local_dir / name, target), f"uploading {name} to {url}")
                if not created and retry(lambda: remote_digest(fs, target), f"reading {target}") != (
                        entry["sha256"], entry["bytes"]):
                    raise PublishConflict(
                        f"{url} is being published by another writer (or an earlier failed attempt left a different "
                        f"{name} there; it has no {MANIFEST}, so nobody trusts it: remove it or choose another URL)"
                    )
            else:
                retry(lambda: fs.put_file(str(local_dir / name), target), f"uploading {name} to {url}")
            faults.point("publish-file-uploaded")  # crash windows for the fault tests (sspo.faults)
        if verify:
            for name, entry in manifest["files"].items():
                target = join(remote, name)
                if retry(lambda: remote_digest(fs, target), f"reading {target}") != (entry["sha256"], entry["bytes"]):
                    raise SSPOError(f"{url}: {name} differs from the local file after upload; nothing was published")
    faults.point("publish-manifest-next")
    payload = json.dumps(manifest, indent=2, sort_keys=True).encode()
    manifest_url = join(url, MANIFEST)
    if not create_bytes(manifest_url, payload) and read_bytes(manifest_url) != payload:
        raise PublishConflict(f"{url} was published by another writer at the same time")
    return url


@contextlib.contextmanager
def staged_output(url: str, extra: dict | None = None):
    """A local folder to build an output in; published to `url` (manifest last) only if the block succeeds.

    An existing output is never touched: a complete one is refused, and so is a leftover without a manifest.
    """
    require_writable(url)
    if is_published(url):
        raise SSPOError(f"{url} already exists; outputs are never overwritten (choose another output)")
    if is_local(url) and local_path(url).exists():
        raise SSPOError(f"{url} exists but holds no complete output (no {MANIFEST}); remove it first")
    parent_dir = local_path(url).parent if is_local(url) else None
    if parent_dir is not None:
        parent_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sspo-staging-", dir=parent_dir) as scratch:
        # one level down: the temporary folder itself is private (0700); mkdir gives the mode the umask allows
        staging = Path(scratch) / "output"
        staging.mkdir()
        meta = extra if extra is not None else {}
        yield staging, meta
        if is_local(url):
            staging.rename(local_path(url))
            publish_dir(local_path(url), url, meta)
        else:
            publish_dir(staging, url, meta)
