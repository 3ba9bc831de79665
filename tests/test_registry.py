"""The checkpoint registry against a real S3 server (moto on loopback) and a local folder."""

import hashlib
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from s3server import BUCKET

from sspo import config, registry, storage
from sspo.cli import main
from sspo.errors import SSPOError
from sspo.run_store import resolve_checkpoint
from sspo.stages import run_train


@pytest.fixture
def s3_root(s3):
    return f"s3://{BUCKET}/registry-{uuid.uuid4().hex[:8]}"


def sspo(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def register_config(root, checkpoint, prepared, **overrides):
    values = {"registry": root, "name": "toy", "checkpoint": checkpoint, "data": prepared, "alias": "", **overrides}
    return config.load("register", None, values)


def test_publish_list_promote_show_pull(s3_root, trained_run, prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"score": 0.5}))
    code, out, err = sspo(capsys, "register", "--registry", s3_root, "--name", "toy", "--checkpoint", trained_run,
                          "--data", prepared, "--metrics", metrics, "--alias", "candidate")
    assert code == 0, err
    record = json.loads(out)
    assert record["version"] == "1" and record["url"] == f"{s3_root}/toy/versions/1"

    code, out, err = sspo(capsys, "registry", "publish", "--registry", s3_root, "--name", "toy",
                          "--checkpoint", f"{trained_run}/checkpoints/step-0000001", "--data", prepared, "--alias", "")
    assert code == 0, err
    assert json.loads(out)["version"] == "2"

    code, out, _ = sspo(capsys, "registry", "list", "--registry", s3_root)
    assert json.loads(out) == {"toy": {"versions": ["1", "2"], "aliases": {"candidate": "1"}}}

    assert sspo(capsys, "registry", "promote", "--registry", s3_root, "--name", "toy", "--version", "2",
                "--alias", "candidate")[0] == 0
    assert sspo(capsys, "registry", "promote", "--registry", s3_root, "--name", "toy", "--version", "1",
                "--alias", "production")[0] == 0
    assert registry.list_aliases(s3_root, "toy") == {"candidate": "2", "production": "1"}
    assert [c["version"] for c in registry.alias_history(s3_root, "toy", "candidate")] == ["1", "2"]

    code, out, err = sspo(capsys, "registry", "show", "--registry", s3_root, "--name", "toy", "--alias", "production")
    assert code == 0, err
    lineage = json.loads(out)
    manifest_sha = hashlib.sha256(Path(prepared, "manifest.json").read_bytes()).hexdigest()
    assert lineage["data"] == {"uri": prepared, "sha256": manifest_sha}
    assert lineage["step"] == 2 and lineage["kind"] == "full" and lineage["metrics"] == {"score": 0.5}
    assert lineage["train_config"]["steps"] == 2 and lineage["code"]["sspo_version"]
    assert lineage["checkpoint"] == f"{trained_run}/checkpoints/step-0000002"

    code, out, err = sspo(capsys, "registry", "pull", "--registry", s3_root, "--name", "toy", "--alias", "production",
                          "--output", tmp_path / "pulled")
    assert code == 0, err
    pulled = load_file(tmp_path / "pulled" / "unet.safetensors")
    trained = load_file(Path(trained_run, "checkpoints", "step-0000002", "unet.safetensors"))
    assert all(pulled[k].equal(trained[k]) for k in trained)

    # a version folder, or an alias object, is a checkpoint URL
    assert resolve_checkpoint(f"{s3_root}/toy/aliases/production.json") == f"{s3_root}/toy/versions/1"
    code, _, err = sspo(capsys, "registry", "show", "--registry", s3_root, "--name", "toy", "--version", "9")
    assert code == 2 and "not published" in err


def test_tampered_object_is_refused_on_pull(s3, s3_root, trained_run, prepared, tmp_path, capsys):
    registry.register(register_config(s3_root, trained_run, prepared, version="1"))
    key = f"{s3_root.removeprefix(f's3://{BUCKET}/')}/toy/versions/1/unet.safetensors"
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=b"not the weights")
    code, _, err = sspo(capsys, "registry", "pull", "--registry", s3_root, "--name", "toy", "--version", "1",
                        "--output", tmp_path / "pulled")
    assert code == 2
    assert "unet.safetensors does not match its sha256" in err and "Traceback" not in err
    assert not (tmp_path / "pulled").exists()


def test_two_concurrent_publishers_of_one_version_exactly_one_wins(s3_root, trained_run, prepared):
    checkpoints = [f"{trained_run}/checkpoints/step-0000001", f"{trained_run}/checkpoints/step-0000002"]
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def publish(checkpoint):
        start.wait()
        try:
            outcomes[checkpoint] = registry.register(register_config(s3_root, checkpoint, prepared, version="3"))
        except SSPOError as err:
            outcomes[checkpoint] = err

    threads = [threading.Thread(target=publish, args=(c,)) for c in checkpoints]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [c for c, outcome in outcomes.items() if isinstance(outcome, dict)]
    losers = [outcome for outcome in outcomes.values() if isinstance(outcome, SSPOError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert "another writer" in str(losers[0])
    # the published version is entirely the winner's
    assert registry.list_versions(s3_root, "toy") == ["3"]
    pulled = storage.download_dir(registry.version_url(s3_root, "toy", "3"), storage.cache_root() / uuid.uuid4().hex,
                                  require_manifest=True)
    assert json.loads((pulled / "lineage.json").read_text())["checkpoint"] == winners[0]


def fake_checkpoint(directory: Path, weight_bytes: int) -> str:
    """A checkpoint folder whose weights file is big enough for an upload to be cut in the middle."""
    staging = directory / "staging"
    staging.mkdir(parents=True)
    save_file({"weight": torch.rand(max(1, weight_bytes // 4))}, str(staging / "unet.safetensors"))
    (staging / "checkpoint.json").write_text(json.dumps({"kind": "full", "step": 1, "lora_rank": 0}))
    return storage.publish_dir(staging, str(staging))


@pytest.mark.slow
def test_server_crash_mid_publish_leaves_no_version_and_a_retry_succeeds(s3, s3_root, prepared, tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 48 << 20)
    prefix = f"{s3_root.removeprefix(f's3://{BUCKET}/')}/toy/versions/1/"
    client = s3.client()

    registering = threading.Event()

    def crash_after_first_object():
        while not client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount"):
            if not registering.is_set():  # register ended before uploading anything: let the test say why
                return
            time.sleep(0.005)
        s3.stop()

    registering.set()
    watcher = threading.Thread(target=crash_after_first_object)
    watcher.start()
    try:
        with pytest.raises(SSPOError, match="failed after 3 attempts"):
            registry.register(register_config(s3_root, checkpoint, prepared, version="1"))
    finally:
        registering.clear()
        watcher.join()
        if not s3.running:
            s3.start()
    s3.ensure_bucket()
    left = [o["Key"].removeprefix(prefix) for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert left and "manifest.json" not in left and "unet.safetensors" not in left
    assert registry.list_versions(s3_root, "toy") == []
    with pytest.raises(SSPOError, match="not published"):
        registry.resolve_version(s3_root, "toy", version="1")

    registry.register(register_config(s3_root, checkpoint, prepared, version="1"))
    assert registry.list_versions(s3_root, "toy") == ["1"]
    storage.verify_dir(storage.fetch_dir(registry.version_url(s3_root, "toy", "1")))


def test_local_registry_refuses_bad_names_and_unknown_versions(trained_run, prepared, tmp_path, capsys):
    root = str(tmp_path / "registry")
    code, _, err = sspo(capsys, "register", "--registry", root, "--name", "../escape", "--checkpoint", trained_run,
                        "--data", prepared)
    assert code == 2 and "invalid model name" in err
    registry.register(register_config(root, trained_run, prepared, version="v1"))
    with pytest.raises(SSPOError, match="another writer|already exists"):
        registry.register(register_config(root, trained_run, prepared, version="v1"))
    code, _, err = sspo(capsys, "registry", "promote", "--registry", root, "--name", "toy", "--version", "v2",
                        "--alias", "production")
    assert code == 2 and "not published" in err


@pytest.mark.slow
def test_replay_pool_draws_a_checkpoint_from_s3(s3_root, trained_run, base_model, prepared, tmp_path):
    version = registry.register(register_config(s3_root, trained_run, prepared))["url"]
    tiny = {"model": base_model, "data": prepared, "steps": 2, "batch_size": 2, "sample_steps": 2,
            "save_every": 10, "lr_warmup_steps": 1, "replay": "latest", "replay_from": version}
    run_train(config.load("train", None, {**tiny, "output": str(tmp_path / "run")}))
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000002" / "training_state.json").read_text())
    assert state["pool"] == ["base", version]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["ref_index"] for row in log] == [1, 1]

    with pytest.raises(SSPOError, match="holds full UNet weights, but this run needs a LoRA adapter"):
        run_train(config.load("train", None, {**tiny, "output": str(tmp_path / "lora"), "lora_rank": 4}))


# -- bad inputs, missing buckets, refused credentials, dropped connections and concurrent promotions, through the
# CLI: each ends in exit 2 and one line, publishes nothing and moves no alias


def tiny_data(directory: Path) -> str:
    """Prepared data as register reads it: a folder with a manifest."""
    directory.mkdir(parents=True)
    (directory / "shard.txt").write_text("pairs")
    return storage.publish_dir(directory, str(directory))


def assert_one_error_line(code: int, err: str, stage: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sspo {stage}: error: "), err
    return lines[0]


def registry_state(capsys, root: str) -> dict:
    code, out, err = sspo(capsys, "registry", "list", "--registry", root)
    assert code == 0, err
    return json.loads(out)


def test_register_checks_names_and_urls_before_publishing(s3_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: only the flags given here
    checkpoint, data = fake_checkpoint(tmp_path / "run", 1000), tiny_data(tmp_path / "data")
    for root in (s3_root, str(tmp_path / "registry")):
        register = ["register", "--registry", root, "--name", "toy", "--checkpoint", checkpoint, "--data", data]
        assert sspo(capsys, *register, "--alias", "candidate")[0] == 0
        before = registry_state(capsys, root)
        for flags, message in ((["--alias", "../../evil"], "invalid alias '../../evil'"),
                               (["--version", "../2"], "invalid version '../2'"),
                               (["--output", "dvc://runs/registered.json"], "dvc:// URLs are read-only"),
                               (["--output", "s3://nosuchbucket/registered.json"], "'nosuchbucket' does not exist"),
                               (["--metrics", tmp_path / "missing.json"], "not found")):
            line = assert_one_error_line(*sspo(capsys, *register, *flags)[::2], "register")
            assert message in line
            assert registry_state(capsys, root) == before == {"toy": {"versions": ["1"], "aliases": {"candidate": "1"}}}


def test_a_missing_bucket_is_an_error_for_every_registry_command(s3, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = "s3://nosuchbucket/registry"
    checkpoint, data = fake_checkpoint(tmp_path / "run", 1000), tiny_data(tmp_path / "data")
    for command in (["registry", "list", "--registry", root],
                    ["registry", "list", "--registry", root, "--name", "toy"],
                    ["registry", "show", "--registry", root, "--name", "toy", "--version", "1"],
                    ["registry", "promote", "--registry", root, "--name", "toy", "--version", "1", "--alias", "prod"],
                    ["registry", "pull", "--registry", root, "--name", "toy", "--alias", "prod", "--output", "out"],
                    ["register", "--registry", root, "--name", "toy", "--checkpoint", checkpoint, "--data", data],
                    ["registry", "publish", "--registry", root, "--name", "toy", "--checkpoint", checkpoint,
                     "--data", data]):
        line = assert_one_error_line(*sspo(capsys, *command)[::2], command[0])
        assert "the bucket 'nosuchbucket' does not exist" in line
    assert "nosuchbucket" not in [bucket["Name"] for bucket in s3.client().list_buckets()["Buckets"]]
    assert not (tmp_path / "out").exists()


def test_refused_credentials_end_in_one_line(s3, s3_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint, data = fake_checkpoint(tmp_path / "run", 1000), tiny_data(tmp_path / "data")
    register = ["register", "--registry", s3_root, "--name", "toy", "--checkpoint", checkpoint, "--data", data]
    assert sspo(capsys, *register, "--alias", "production")[0] == 0
    assert sspo(capsys, *register, "--alias", "")[0] == 0
    before = registry_state(capsys, s3_root)
    with s3.reject_credentials():
        for command in (["registry", "list", "--registry", s3_root],
                        ["registry", "show", "--registry", s3_root, "--name", "toy", "--alias", "production"],
                        ["registry", "promote", "--registry", s3_root, "--name", "toy", "--version", "2",
                         "--alias", "production"],
                        ["registry", "pull", "--registry", s3_root, "--name", "toy", "--version", "1",
                         "--output", "pulled"],
                        register,
                        ["register", "--registry", str(tmp_path / "local"), "--name", "toy",
                         "--checkpoint", f"{s3_root}/toy/versions/1", "--data", data]):
            line = assert_one_error_line(*sspo(capsys, *command)[::2], command[0])
            assert "s3://" in line and "access denied" in line
    assert registry_state(capsys, s3_root) == before == {"toy": {"versions": ["1", "2"],
                                                                 "aliases": {"production": "1"}}}
    assert not (tmp_path / "pulled").exists() and not (tmp_path / "local").exists()


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_ends_in_one_line(tmp_path, capsys, monkeypatch):
    """An OSError no stage anticipated (here ENOSPC, from /dev/full) is one line, not a traceback. The output
    record is written last, once the version it names exists, so the version stays published."""
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "registry")
    line = assert_one_error_line(*sspo(capsys, "register", "--registry", root, "--name", "toy", "--alias", "",
                                       "--checkpoint", fake_checkpoint(tmp_path / "run", 1000),
                                       "--data", tiny_data(tmp_path / "data"), "--output", "/dev/full")[::2],
                                 "register")
    assert "No space left on device" in line
    assert registry.list_versions(root, "toy") == ["1"]


def test_a_dropped_connection_gives_one_line_and_no_asyncio_tracebacks(s3, s3_root, tmp_path):
    """The server crashes in the middle of `sspo register` and what is left on its port accepts connections and
    drops them. Each upload sent on such a connection used to leave an aiohttp body writer whose failure nobody
    retrieved: asyncio printed "Task exception was never retrieved" and a traceback for each."""
    checkpoint, data = fake_checkpoint(tmp_path / "run", 1 << 20), tiny_data(tmp_path / "data")
    version_prefix = f"/{s3_root.removeprefix('s3://')}/toy/versions/1/"
    s3.crash_after(lambda method, path: method == "PUT" and path.startswith(version_prefix), keep_accepting=True)
    try:
        result = subprocess.run([sys.executable, "-m", "sspo", "register", "--registry", s3_root, "--name", "toy",
                                 "--checkpoint", checkpoint, "--data", data, "--alias", "candidate"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        s3.start()
    assert result.returncode == 2, result.stderr
    assert "never retrieved" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()  # retry warnings, then the error
    assert [line for line in lines if line.startswith("sspo ")] == lines[-1:], result.stderr
    assert lines[-1].startswith("sspo register: error: uploading "), result.stderr
    assert registry.list_versions(s3_root, "toy") == [] and registry.list_aliases(s3_root, "toy") == {}


def promotions_chain(root: str, records: list[dict]) -> None:
    """The alias history is one chain in which every change replaced the one before it, and the record each
    promoter got back is its own change in that chain."""
    history = registry.alias_history(root, "toy", "production")
    assert [change["previous"] for change in history] == [None] + [change["version"] for change in history[:-1]]
    assert sorted(history, key=lambda change: change["change"]) == sorted(records, key=lambda r: r["change"])
    assert registry.read_alias(root, "toy", "production") == history[-1]


@pytest.mark.parametrize("where", ["s3", "local"])
def test_concurrent_promotions_each_replace_the_version_they_name(where, s3_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = s3_root if where == "s3" else str(tmp_path / "registry")
    checkpoint, data = fake_checkpoint(tmp_path / "run", 1000), tiny_data(tmp_path / "data")
    for _ in range(3):
        assert sspo(capsys, "register", "--registry", root, "--name", "toy", "--checkpoint", checkpoint,
                    "--data", data, "--alias", "")[0] == 0
    versions = ["1", "2", "3"] * 3

    start, records = threading.Barrier(len(versions)), []

    def promote(version):
        start.wait()
        records.append(registry.set_alias(root, "toy", "production", version))

    threads = [threading.Thread(target=promote, args=(version,)) for version in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(records) == len(versions)
    promotions_chain(root, records)

    # separate processes through the CLI, each printing what it replaced
    promoters = [subprocess.Popen([sys.executable, "-m", "sspo", "registry", "promote", "--registry", root,
                                   "--name", "toy", "--version", version, "--alias", "production"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for version in ["1", "2", "3", "2"]]
    outputs = [promoter.communicate(timeout=300) for promoter in promoters]
    assert [promoter.returncode for promoter in promoters] == [0] * len(promoters), outputs
    promotions_chain(root, records + [json.loads(out) for out, _ in outputs])


def test_non_finite_weights_and_names_ending_in_a_newline_are_refused(trained_run, prepared, tmp_path, capsys):
    diverged = tmp_path / "diverged"
    shutil.copytree(resolve_checkpoint(trained_run), diverged)
    weights = load_file(diverged / "unet.safetensors")
    save_file({name: torch.full_like(tensor, math.nan) for name, tensor in weights.items()},
              str(diverged / "unet.safetensors"))
    (diverged / "manifest.json").write_text(json.dumps(storage.write_manifest(diverged)))
    root = str(tmp_path / "registry")
    code, _, err = sspo(capsys, "register", "--params", "", "--registry", root, "--name", "toy", "--checkpoint",
                        diverged, "--data", prepared)
    assert code == 2 and "holds NaN or inf values" in err and "Traceback" not in err
    for flag in ("--name", "--alias"):
        code, _, err = sspo(capsys, "register", "--params", "", "--registry", root, "--name", "toy",
                            "--checkpoint", trained_run, "--data", prepared, flag, "x\n")
        assert code == 2 and "invalid" in err
    assert registry.list_versions(root, "toy") == []
