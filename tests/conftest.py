"""Session fixtures: a small toy world, a briefly bootstrapped base model and prepared shards, built once."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sspo import config  # noqa: E402
from sspo.cli import run_bootstrap, run_prepare, run_world  # noqa: E402


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("toy") / "world")
    run_world(config.load("world", None, {"output": output, "samples_per_scene": 4}))
    return output


@pytest.fixture(scope="session")
def base_model(toy_world, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("toy") / "base")
    overrides = {"world": toy_world, "output": output, "vae_steps": 30, "unet_steps": 30, "unet_batch_size": 16}
    run_bootstrap(config.load("bootstrap", None, overrides))
    return output


@pytest.fixture(scope="session")
def prepared(toy_world, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("toy") / "prepared")
    run_prepare(config.load("prepare", None, {"source": toy_world, "output": output}))
    return output
