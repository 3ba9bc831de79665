"""Loading a diffusers SD-1.x/2.x folder (local path or URL) and applying trained checkpoints to it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel

from sspo import storage
from sspo.run_store import CHECKPOINT_INFO, CHECKPOINT_WEIGHTS
from sspo.errors import SSPOError

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


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
    for module in (components.vae, components.text_encoder):
        module.requires_grad_(False).eval()
    return components


def base_unet_weights(path: Path) -> Path:
    return path / "unet" / "diffusion_pytorch_model.safetensors"


def lora_config(rank: int, alpha: float) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGET_MODULES, init_lora_weights="gaussian"
    )


def apply_checkpoint(unet: UNet2DConditionModel, checkpoint_url: str) -> dict:
    """Load a trained checkpoint (full UNet or LoRA adapter) into `unet`; returns its checkpoint.json."""
    directory = storage.fetch_dir(checkpoint_url)
    storage.verify_dir(directory)
    info = json.loads((directory / CHECKPOINT_INFO).read_text())
    weights = load_file(directory / CHECKPOINT_WEIGHTS)
    if info["kind"] == "lora":
        unet.add_adapter(lora_config(info["lora_rank"], info["lora_alpha"]), adapter_name="trained")
        set_peft_model_state_dict(unet, weights, adapter_name="trained")
        unet.set_adapter("trained")
    else:
        unet.load_state_dict(weights)
    logging.getLogger(__name__).info("applied %s checkpoint at step %s from %s", info["kind"], info["step"], checkpoint_url)
    return info


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
