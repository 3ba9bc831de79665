"""Session fixtures: a small toy world, a briefly bootstrapped base model and prepared shards, built once."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sspo import config  # noqa: E402
from sspo.stages import run_bootstrap, run_prepare, run_world  # noqa: E402


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
def sdxl_model(toy_world, tmp_path_factory):
    """The SDXL-shaped toy base (two text encoders, pooled embedding, time ids), briefly bootstrapped."""
    output = str(tmp_path_factory.mktemp("toy") / "sdxl-base")
    overrides = {"world": toy_world, "output": output, "vae_steps": 30, "unet_steps": 30, "unet_batch_size": 16,
                 "family": "sdxl"}
    run_bootstrap(config.load("bootstrap", None, overrides))
    return output


@pytest.fixture(scope="session")
def prepared(toy_world, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("toy") / "prepared")
    run_prepare(config.load("prepare", None, {"source": toy_world, "output": output}))
    return output


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (moto) on loopback with a bucket; the AWS variables point at it for the rest of the session,
    and the sspo cache is private to the session (remote URLs are cached by name)."""
    from s3server import S3Server, apply_env, restore_env

    server = S3Server()
    server.start()
    previous = apply_env({**server.env(), "SSPO_CACHE": str(tmp_path_factory.mktemp("sspo-cache"))})
    server.ensure_bucket()
    yield server
    restore_env(previous)
    if server.running:
        server.stop()


@pytest.fixture(scope="session")
def trained_run(base_model, prepared, tmp_path_factory):
    """A two-step full fine-tune with a published checkpoint after each step."""
    from sspo.stages import run_train

    output = str(tmp_path_factory.mktemp("toy") / "run")
    overrides = {"model": base_model, "data": prepared, "output": output, "steps": 2, "batch_size": 2,
                 "save_every": 1, "sample_steps": 2, "lr_warmup_steps": 1}
    run_train(config.load("train", None, overrides))
    return output
