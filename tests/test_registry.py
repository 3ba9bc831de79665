"""The checkpoint registry against a real S3 server (moto on loopback) and a local folder."""

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file
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
    (staging / "unet.safetensors").write_bytes(os.urandom(weight_bytes))
    (staging / "checkpoint.json").write_text(json.dumps({"kind": "full", "step": 1, "lora_rank": 0}))
    return storage.publish_dir(staging, str(staging))


@pytest.mark.slow
def test_server_crash_mid_publish_leaves_no_version_and_a_retry_succeeds(s3, s3_root, prepared, tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 48 << 20)
    prefix = f"{s3_root.removeprefix(f's3://{BUCKET}/')}/toy/versions/1/"
    client = s3.client()

    def crash_after_first_object():
        while not client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount"):
            time.sleep(0.005)
        s3.stop()

    watcher = threading.Thread(target=crash_after_first_object)
    watcher.start()
    try:
        with pytest.raises(SSPOError, match="failed after 3 attempts"):
            registry.register(register_config(s3_root, checkpoint, prepared, version="1"))
    finally:
        watcher.join()
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
