"""Loading a diffusers SD-1.x/2.x folder (local path or URL) and applying trained checkpoints to it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel

from sspo import storage
from sspo.run_store import CHECKPOINT_INFO, CHECKPOINT_WEIGHTS
from sspo.errors import SSPOError

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Components:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sample_scheduler: DDIMScheduler
    path: Path

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)


def load_components(model_url: str) -> Components:
    """The parts of a Stable Diffusion folder that training and sampling need, loaded offline."""
    path = storage.fetch_dir(model_url)
    missing = [name for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler") if not (path / name).is_dir()]
    if missing:
        raise SSPOError(f"{model_url} is not a Stable Diffusion diffusers folder: missing {', '.join(missing)}/")
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        components = Components(
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True),
            tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True),
            noise_scheduler=noise_scheduler,
            sample_scheduler=DDIMScheduler.from_config(noise_scheduler.config),
            path=path,
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise SSPOError(f"cannot load the model at {model_url}: {err}") from None
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise SSPOError(f"{model_url}: its scheduler's prediction_type {prediction_type!r} is not supported "
                        f"(use a model that predicts {' or '.join(PREDICTION_TYPES)})")
    for module in (components.vae, components.text_encoder):
        module.requires_grad_(False).eval()
    return components


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at these timesteps: the noise (epsilon) or the velocity (v_prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def base_unet_weights(path: Path) -> Path:
    return path / "unet" / "diffusion_pytorch_model.safetensors"


def lora_config(rank: int, alpha: float) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGET_MODULES, init_lora_weights="gaussian"
    )


def describe_weights(info: dict) -> str:
    if info["kind"] == "lora":
        return f"a LoRA adapter (rank {info['lora_rank']}, alpha {info['lora_alpha']:g})"
    return "full UNet weights"


def read_checkpoint_info(directory: Path, checkpoint_url: str) -> dict:
    """The checkpoint's checkpoint.json, checked to describe weights this code can load."""
    try:
        info = json.loads((directory / CHECKPOINT_INFO).read_text())
    except (OSError, ValueError) as err:
        raise SSPOError(f"{checkpoint_url}: cannot read its {CHECKPOINT_INFO}: {err}") from None
    kind = info.get("kind") if isinstance(info, dict) else None
    lora_shape = (kind == "lora" and isinstance(info.get("lora_rank"), int) and info["lora_rank"] > 0
                  and isinstance(info.get("lora_alpha"), (int, float)))
    if not (kind == "full" or lora_shape):
        raise SSPOError(f"{checkpoint_url}: its {CHECKPOINT_INFO} describes no weights this code can load (expected "
                        "kind full, or kind lora with a positive lora_rank and a lora_alpha)")
    return info


def weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """'' when `found` holds exactly the tensors of `expected`, shape for shape; else what differs, in brief."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(name for name in expected.keys() & found.keys() if expected[name].shape != found[name].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if reshaped:
        name = reshaped[0]
        problems.append(f"{len(reshaped)} tensors of another shape (e.g. {name}: {tuple(found[name].shape)} in the "
                        f"file, {tuple(expected[name].shape)} expected)")
    return "; ".join(problems)


def apply_checkpoint(unet: UNet2DConditionModel, checkpoint_url: str) -> dict:
    """Load a trained checkpoint (full UNet or LoRA adapter) into `unet`; returns its checkpoint.json.

    The weights are checked against what checkpoint.json says they are before loading: loading is lenient (an
    adapter's state dict loads with strict=False, so a full UNet file given as an adapter would load nothing).
    """
    directory = storage.fetch_dir(checkpoint_url)
    storage.verify_dir(directory)
    info = read_checkpoint_info(directory, checkpoint_url)
    try:
        weights = load_file(directory / CHECKPOINT_WEIGHTS)
    except (SafetensorError, OSError) as err:
        raise SSPOError(f"{checkpoint_url}: {CHECKPOINT_WEIGHTS} is not a readable safetensors file: {err}") from None
    if info["kind"] == "lora":
        unet.add_adapter(lora_config(info["lora_rank"], info["lora_alpha"]), adapter_name="trained")
        expected = get_peft_model_state_dict(unet, adapter_name="trained")
    else:
        expected = unet.state_dict()
    mismatch = weights_mismatch(expected, weights)
    if mismatch:
        raise SSPOError(f"{checkpoint_url}: {CHECKPOINT_WEIGHTS} does not hold {describe_weights(info)} for this "
                        f"model, as its {CHECKPOINT_INFO} says: {mismatch}")
    if info["kind"] == "lora":
        set_peft_model_state_dict(unet, weights, adapter_name="trained")
        unet.set_adapter("trained")
    else:
        unet.load_state_dict(weights)
    logging.getLogger(__name__).info("applied %s checkpoint at step %s from %s", info["kind"], info.get("step"),
                                     checkpoint_url)
    return info


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
