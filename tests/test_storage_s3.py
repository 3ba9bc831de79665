"""Storage URLs against a real S3 server (moto on loopback) and a real DVC repository."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from s3server import BUCKET

from sspo import storage
from sspo.errors import SSPOError

DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture
def prefix(s3):
    return f"s3://{BUCKET}/storage-{uuid.uuid4().hex[:8]}"


def folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_publish_fetch_and_verify_on_s3(prefix, tmp_path):
    source = folder(tmp_path / "src", {"a.bin": b"a" * 1000, "sub/b.txt": b"b"})
    url = storage.publish_dir(source, f"{prefix}/out", {"note": "x"}, exclusive=True, verify=True)
    manifest = storage.read_json(f"{url}/manifest.json")
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.txt"] and manifest["note"] == "x"
    fetched = storage.fetch_dir(url)
    assert (fetched / "sub" / "b.txt").read_bytes() == b"b"
    with pytest.raises(SSPOError, match="never overwritten"):
        storage.publish_dir(source, url)


def test_exclusive_publish_never_overwrites_another_writers_file(s3, prefix, tmp_path):
    key = f"{prefix.removeprefix(f's3://{BUCKET}/')}/out/a.bin"
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=b"someone else's")
    source = folder(tmp_path / "src", {"a.bin": b"mine"})
    with pytest.raises(storage.PublishConflict, match="another writer"):
        storage.publish_dir(source, f"{prefix}/out", exclusive=True)
    assert s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"someone else's"
    assert not storage.exists(f"{prefix}/out/manifest.json")


def test_unreachable_store_is_retried_then_reported(s3, prefix):
    storage.write_text(f"{prefix}/note.txt", "hello")
    s3.stop()
    try:
        with pytest.raises(SSPOError, match=r"reading .*note.txt failed after 3 attempts"):
            storage.read_text(f"{prefix}/note.txt")
    finally:
        s3.start()
    assert storage.read_text(f"{prefix}/note.txt") == "hello"
    with pytest.raises(SSPOError, match="not found"):  # a missing object is not retried
        storage.read_text(f"{prefix}/missing.txt")


def test_transient_errors_are_recognised():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("InternalError", 500))
    assert not storage.is_transient(client_error("AccessDenied", 403))
    assert not storage.is_transient(FileNotFoundError("gone"))
    assert not storage.is_transient(FileExistsError("there"))


def test_dvc_urls_route_to_the_dvc_filesystem(tmp_path):
    repo = tmp_path / "repo"
    (repo / "weights").mkdir(parents=True)
    (repo / "weights" / "w.txt").write_text("v1")
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                    ["git", "config", "user.name", "ci"], [*DVC, "init", "-q"],
                    [*DVC, "config", "core.analytics", "false"], [*DVC, "add", "-q", "weights"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "v1"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    first = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "weights" / "w.txt").write_text("v2")

    url = storage.dvc_url("weights", str(repo), first)
    assert url == f"dvc://weights?repo={repo}&rev={first}"
    assert storage.join(url, "w.txt") == f"dvc://weights/w.txt?repo={repo}&rev={first}"
    assert storage.read_text(storage.join(url, "w.txt")) == "v1"
    assert (storage.fetch_dir(url) / "w.txt").read_text() == "v1"
    with pytest.raises(SSPOError, match="read-only"):
        storage.write_text(storage.join(url, "x.txt"), "no")
    with pytest.raises(SSPOError, match="unknown Git revision"):
        storage.exists(storage.dvc_url("weights", str(repo), "no-such-rev"))
    with pytest.raises(SSPOError, match="bad DVC URL"):
        storage.exists("dvc://weights?revision=HEAD")


@pytest.mark.parametrize("where", ["s3", "local"])
def test_write_if_unchanged_refuses_a_stale_token(where, prefix, tmp_path):
    url = f"{prefix}/alias.json" if where == "s3" else str(tmp_path / "aliases" / "alias.json")
    assert storage.read_for_update(url) == (None, None)
    storage.write_if_unchanged(url, b"first", None)
    with pytest.raises(storage.ConcurrentChange):  # it exists now: a create is refused
        storage.write_if_unchanged(url, b"second", None)
    data, token = storage.read_for_update(url)
    assert data == b"first"
    storage.write_if_unchanged(url, b"second", token)
    with pytest.raises(storage.ConcurrentChange):  # token names "first", which was replaced
        storage.write_if_unchanged(url, b"third", token)
    assert storage.read_for_update(url)[0] == b"second"


def test_train_with_refused_s3_credentials_ends_in_one_line(s3, prefix, base_model, tmp_path, capsys, monkeypatch):
    """Every stage reads through the storage helpers, so a refused access is one line everywhere."""
    from sspo.cli import main

    monkeypatch.chdir(tmp_path)  # no params.yaml
    with s3.reject_credentials():
        code = main(["train", "--model", base_model, "--data", f"{prefix}/prepared", "--output", "run",
                     "--steps", "1", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("sspo train: error: ") and "access denied" in err, err
    assert f"{prefix}/prepared" in err
    assert not (tmp_path / "run").exists()


def test_local_text_is_replaced_whole_and_a_link_is_written_through(tmp_path):
    target = tmp_path / "records" / "cell.json"
    storage.write_text(str(target), "one")
    storage.write_text(str(target), "two")
    assert target.read_text() == "two" and [path.name for path in target.parent.iterdir()] == ["cell.json"]
    link = tmp_path / "link.json"
    link.symlink_to(target)
    storage.write_text(str(link), "three")
    assert link.is_symlink() and target.read_text() == "three"
