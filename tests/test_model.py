import json
import math
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from failure_tools import assert_one_line_error

from sspo import config
from sspo.cli import main
from sspo.models import denoising_target
from sspo.stages import run_bootstrap, run_evaluate, run_train
from sspo.toy import oracle, world
from sspo.toy.model import build_noise_scheduler


def test_base_model_is_a_stable_diffusion_folder_that_diffusers_loads(base_model):
    pipeline = DiffusionPipeline.from_pretrained(base_model)
    assert isinstance(pipeline, StableDiffusionPipeline)
    image = pipeline("a red circle on the left", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    assert 0.0 <= oracle.score(image, world.Scene("red", "circle", "left"))["score"] <= 1.0


def test_training_target_is_the_noise_or_the_velocity():
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 999])
    assert denoising_target(build_noise_scheduler("epsilon"), latents, noise, t) is noise
    scheduler = build_noise_scheduler("v_prediction")
    assert torch.equal(denoising_target(scheduler, latents, noise, t), scheduler.get_velocity(latents, noise, t))


def test_a_model_predicting_something_else_is_refused_in_one_line(base_model, prepared, tmp_path, capsys):
    model = tmp_path / "sample-model"
    shutil.copytree(base_model, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "sample"}))
    assert main(["train", "--params", "", "--model", str(model), "--data", prepared,
                 "--output", str(tmp_path / "run")]) == 2
    assert_one_line_error(capsys.readouterr().err, "train", str(model), "prediction_type 'sample'")


@pytest.mark.slow
def test_a_v_prediction_model_bootstraps_trains_and_evaluates(toy_world, prepared, tmp_path):
    model = str(tmp_path / "v-base")
    run_bootstrap(config.load("bootstrap", None, {"world": toy_world, "output": model, "vae_steps": 5,
                                                  "unet_steps": 5, "prediction_type": "v_prediction"}))
    pipeline = DiffusionPipeline.from_pretrained(model)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    summary = run_train(config.load("train", None, {
        "model": model, "data": prepared, "output": str(tmp_path / "run"), "steps": 2, "batch_size": 2,
        "save_every": 1, "sample_steps": 2, "lr_warmup_steps": 1}))
    assert summary["final_step"] == 2 and math.isfinite(summary["final_loss"])
    run_evaluate(config.load("evaluate", None, {
        "model": model, "checkpoint": str(tmp_path / "run"), "output": str(tmp_path / "eval"), "seeds": [0],
        "sample_steps": 2, "max_prompts": 2}))
    assert (tmp_path / "eval" / "manifest.json").exists()
