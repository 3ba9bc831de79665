"""The SDXL family on its toy model: loading, conditioning as diffusers' pipeline builds it, training, evaluation."""

import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from sspo import config
from sspo.models import load_components
from sspo.stages import run_evaluate, run_prepare, run_train
from sspo.toy import oracle, world

PROMPTS = ["a red circle on the left", "a blue square at the top"]


@pytest.fixture(scope="module")
def sdxl_pipeline(sdxl_model):
    return StableDiffusionXLPipeline.from_pretrained(sdxl_model, local_files_only=True)


def test_sdxl_base_is_a_folder_the_sdxl_pipeline_loads_offline(sdxl_pipeline):
    assert sdxl_pipeline.unet.config.addition_embed_type == "text_time"
    assert sdxl_pipeline.text_encoder_2.config.projection_dim == 32
    image = sdxl_pipeline(PROMPTS[0], num_inference_steps=2).images[0]
    assert image.size == (32, 32)
    assert 0.0 <= oracle.score(image, world.Scene("red", "circle", "left"))["score"] <= 1.0


def test_conditioning_is_what_the_sdxl_pipeline_builds(sdxl_model, sdxl_pipeline):
    parts = load_components(sdxl_model)
    assert parts.family == "sdxl" and parts.zero_unconditional
    embeds, negative, pooled, negative_pooled = sdxl_pipeline.encode_prompt(PROMPTS, device="cpu")
    cond, uncond = parts.encode(PROMPTS), parts.unconditional()
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.pooled, pooled)
    assert torch.equal(uncond.expand(2).hidden, negative) and torch.equal(uncond.expand(2).pooled, negative_pooled)
    expected_ids = sdxl_pipeline._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, 32)
    assert torch.equal(cond.time_ids, expected_ids.repeat(2, 1)) and torch.equal(uncond.time_ids, expected_ids)


def test_time_ids_follow_each_images_original_size_and_crop(sdxl_model):
    parts = load_components(sdxl_model)
    geometry = torch.tensor([[20, 40, 0, 4], [32, 32, 0, 0]], dtype=torch.int32)
    assert parts.time_ids(geometry).tolist() == [[20, 40, 0, 4, 32, 32], [32, 32, 0, 0, 32, 32]]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_one_sspo_step_trains_sdxl_full_and_lora(sdxl_model, prepared, tmp_path, lora_rank):
    summary = run_train(config.load("train", None, {
        "model": sdxl_model, "data": prepared, "output": str(tmp_path / "run"), "steps": 1, "batch_size": 2,
        "save_every": 1, "sample_steps": 2, "lr_warmup_steps": 0, "lora_rank": lora_rank}))
    assert summary["final_step"] == 1 and math.isfinite(summary["final_loss"])
    weights = load_file(tmp_path / "run" / "checkpoints" / "step-0000001" / "unet.safetensors")
    if lora_rank:
        assert weights and all("lora" in name for name in weights)
    else:
        base = load_file(f"{sdxl_model}/unet/diffusion_pytorch_model.safetensors")
        assert weights.keys() == base.keys()
        # The pooled text and time-id embedding is trained as well.
        name = "add_embedding.linear_1.weight"
        assert not torch.equal(weights[name], base[name])


@pytest.mark.slow
def test_sdxl_dpo_and_sft_train_and_evaluate_on_the_toy_world(sdxl_model, toy_world, tmp_path):
    paired = str(tmp_path / "paired")
    run_prepare(config.load("prepare", None, {"source": toy_world, "output": paired, "keep_pairs": True}))
    for objective in ("dpo", "sft"):
        summary = run_train(config.load("train", None, {
            "model": sdxl_model, "data": paired, "output": str(tmp_path / objective), "steps": 2, "batch_size": 2,
            "save_every": 1, "lr_warmup_steps": 1, "objective": objective}))
        assert summary["final_step"] == 2 and math.isfinite(summary["final_loss"])
    run_evaluate(config.load("evaluate", None, {
        "model": sdxl_model, "checkpoint": str(tmp_path / "dpo"), "output": str(tmp_path / "eval"), "seeds": [0],
        "sample_steps": 2, "max_prompts": 2}))
    assert "| trained |" in (tmp_path / "eval" / "table.md").read_text()
