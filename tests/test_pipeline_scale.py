"""Retraining that builds on itself (start from a registry alias, replay the last registered versions) against a
real registry on the S3 server, a whole retraining under kfp.local, and the rules that tie the scale-out
parameters together."""

import json
import socket
import uuid
from pathlib import Path

import pytest
from s3server import BUCKET

from sspo import cli, config, registry, storage
from sspo.pipelines import shell

REQUIRED = ["--param", "model_uri=s3://models/base", "--param", "data_uri=s3://data/raw",
            "--param", "registry_url=s3://registry"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("params, message", [
    (["num_nodes=2", "gpus_per_node=0"], "gpus_per_node=0: gpus_per_node must be positive to train on num_nodes=2"),
    (["num_nodes=4", "gpus_per_node=-1"], "gpus_per_node=-1: gpus_per_node must be 0 (train on the CPU"),
])
def test_several_nodes_need_gpus_and_are_refused_before_anything_is_sent(params, message, capsys):
    argv = ["pipeline", "submit", "--host", f"http://127.0.0.1:{closed_port()}", *REQUIRED]
    for param in params:
        argv += ["--param", param]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sspo pipeline: error: invalid pipeline parameter: {message}") and err.count("\n") == 1


@pytest.fixture
def s3_registry(s3, tmp_path):
    """A registry on the S3 server with versions 1, 2 and 3 of `toy` (each a published folder with one file) and
    `production` pointing at version 2."""
    root = f"s3://{BUCKET}/registry-{uuid.uuid4().hex[:8]}"
    for version in ("1", "2", "3"):
        folder = tmp_path / f"v{version}"
        folder.mkdir()
        (folder / "checkpoint.json").write_text(json.dumps({"step": int(version)}))
        storage.publish_dir(folder, registry.version_url(root, "toy", version), exclusive=True)
    registry.set_alias(root, "toy", "production", "2")
    return root


def test_a_retraining_starts_from_the_alias_and_replays_the_last_other_versions(s3_registry, capsys):
    def url(version):
        return registry.version_url(s3_registry, "toy", version)

    assert shell.training_sources(s3_registry, "toy", "production", 2) == (url("2"), [url("1"), url("3")])
    assert "starting from toy version 2 (production)" in capsys.readouterr().out
    assert shell.training_sources(s3_registry, "toy", "production", 1) == (url("2"), [url("3")])
    assert shell.training_sources(s3_registry, "toy", "", 2) == ("", [url("2"), url("3")])
    assert shell.training_sources(s3_registry, "toy", "production", 0) == (url("2"), [])
    assert shell.training_sources(s3_registry, "toy", "production", 10) == (url("2"), [url("1"), url("3")])
    # The first scheduled run of a retraining finds no production version yet: it starts from the base model.
    assert shell.training_sources(s3_registry, "toy", "champion", 0) == ("", [])
    assert "toy has no alias 'champion' yet: starting from the base model" in capsys.readouterr().out
    assert shell.training_sources(s3_registry, "other", "production", 3) == ("", [])

    options = shell.train_options(s3_registry, "toy", "production", 1, " s3://runs/a/checkpoints/step-1 ,",
                                  steps=5)
    assert options == {"steps": 5, "init_from": url("2"), "replay_from": f"s3://runs/a/checkpoints/step-1,{url('3')}"}


@pytest.mark.slow
def test_a_scheduled_retraining_starts_from_production_replays_the_last_versions_and_records_both(
        toy_world, base_model, tmp_path):
    """Two pipeline runs under kfp.local: the first one trains from the base model and is promoted; two more
    versions are then registered; the second run starts from production and replays the last two versions other
    than it, and the version it registers says so in its lineage."""
    from sspo.pipelines.local import run_local

    registry_url = str(tmp_path / "registry")
    tiny = {"steps": 2, "batch_size": 2, "sample_steps": 2, "save_every": 2, "data_limit": 48, "lora_rank": 4,
            "eval_prompts": "toy:heldout", "eval_seeds": "0", "eval_sample_steps": 2, "min_win_rate": 0.0,
            "export": False}
    first = run_local(tmp_path / "first", tiny, registry=registry_url, model=base_model, data=toy_world)
    assert first["promoted"] is True
    assert registry.list_aliases(registry_url, "sspo")["production"] == "1"
    version_one = registry.version_url(registry_url, "sspo", "1")
    data = json.loads((Path(version_one) / registry.LINEAGE).read_text())["data"]["uri"]
    for version in ("2", "3"):  # earlier retrainings that did not make it to production
        registry.register(config.load("register", None, {"registry": registry_url, "name": "sspo", "alias": "",
                                                         "checkpoint": version_one, "data": data, "metrics": ""}))

    run_local(tmp_path / "second", {**tiny, "init_from_alias": "production", "replay_last_versions": 2,
                                    "min_improvement": 1.5}, registry=registry_url, model=base_model, data=toy_world)
    assert registry.list_versions(registry_url, "sspo") == ["1", "2", "3", "4"]
    lineage = json.loads((Path(registry.version_url(registry_url, "sspo", "4")) / registry.LINEAGE).read_text())
    replayed = [registry.version_url(registry_url, "sspo", version) for version in ("2", "3")]
    assert lineage["init_from"] == version_one
    assert lineage["replay_from"] == replayed
    assert lineage["train_config"]["init_from"] == version_one
