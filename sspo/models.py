"""Loading a diffusers SD-1.x/2.x, SDXL or AnimateDiff folder (local path or URL) and applying trained checkpoints
to it.

Video latents are (B, C, frames, h, w), the layout video UNets take; the VAE encodes and decodes the frames as a
batch of images."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNetMotionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from sspo import storage
from sspo.conditioning import Conditioning, encode_text, time_ids, uncropped_geometry
from sspo.run_store import CHECKPOINT_INFO, CHECKPOINT_WEIGHTS
from sspo.errors import SSPOError

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# The same attention projections, inside the motion modules only (peft takes a regular expression).
MOTION_LORA_TARGETS = r".*motion_modules.*\.(to_q|to_k|to_v|to_out\.0)"
TRAIN_MODULES = ("all", "motion")
PREDICTION_TYPES = ("epsilon", "v_prediction")
MODEL_INDEX = "model_index.json"
# model_index.json's pipeline class → the family's name and its text encoders (folder, class).
FAMILIES = {
    "StableDiffusionPipeline": ("sd", [("text_encoder", CLIPTextModel)]),
    "StableDiffusionXLPipeline": ("sdxl", [("text_encoder", CLIPTextModel),
                                           ("text_encoder_2", CLIPTextModelWithProjection)]),
    "AnimateDiffPipeline": ("video", [("text_encoder", CLIPTextModel)]),
}


class ClipTextUNetMotionModel(UNetMotionModel):
    """AnimateDiff's UNet taking one text embedding per clip, (B, tokens, width), as UNet3DConditionModel does.

    UNetMotionModel wants one per frame, (B·frames, tokens, width), which AnimateDiffPipeline makes by repeating the
    prompt's; repeating them here lets training and sampling condition every family alike. The weights and config
    are UNetMotionModel's."""

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        per_frame = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
        return super().forward(sample, timestep, per_frame, *args, **kwargs)


@dataclass
class Encoders:
    """A model's VAE and text encoders: all that encoding images and captions ahead of training needs."""

    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    path: Path
    family: str

    def to(self, device):
        for module in (self.vae, *self.text_encoders):
            module.to(device)
        return self

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log variance) of the VAE's latent distribution of pixels in [-1, 1], unscaled: images (B, 3, H, W)
        give (B, C, h, w), clips (B, frames, 3, H, W) give (B, C, frames, h, w)."""
        if pixels.ndim == 5:
            mean, logvar = self.latent_distribution(pixels.flatten(0, 1))
            return tuple(part.unflatten(0, pixels.shape[:2]).transpose(1, 2) for part in (mean, logvar))
        distribution = self.vae.encode(pixels.to(self.vae.device)).latent_dist
        return distribution.mean, distribution.logvar

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> Conditioning:
        """The prompts' text embeddings (hidden states, and SDXL's pooled embedding), without time ids."""
        return encode_text(self.text_encoders, self.tokenizers, prompts)


@dataclass
class Components(Encoders):
    """Everything training and sampling need: the encoders, the UNet and the schedulers."""

    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sample_scheduler: DDIMScheduler
    # SDXL's unconditional branch sees zero embeddings rather than the encoded empty prompt.
    zero_unconditional: bool = False

    @property
    def video(self) -> bool:
        return self.family == "video"

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def resolution(self) -> int:
        return self.latent_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def time_ids(self, geometry: torch.Tensor | None = None) -> torch.Tensor:
        """SDXL time ids of images with this (original size, crop) geometry; by default uncropped images at the
        model's resolution, as generated ones are."""
        return time_ids(uncropped_geometry(1, self.resolution) if geometry is None else geometry, self.resolution)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Conditioning for `prompts` (for SDXL with the time ids of a generated image)."""
        return self.as_generated(self.embed(prompts))

    def as_generated(self, conditioning: Conditioning) -> Conditioning:
        """Text embeddings with the time ids of a generated image (SDXL; SD conditioning has none)."""
        return conditioning.with_time_ids(self.time_ids().expand(len(conditioning), 6))

    def unconditional(self) -> Conditioning:
        """The classifier-free guidance branch, batch size 1."""
        empty = self.encode([""])
        if not self.zero_unconditional:
            return empty
        return Conditioning(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled), empty.time_ids)


def read_model_index(path: Path, model_url: str) -> dict:
    """The folder's model_index.json: its pipeline class and the class of each component."""
    try:
        index = json.loads((path / MODEL_INDEX).read_text())
    except (OSError, ValueError) as err:
        raise SSPOError(f"{model_url} is not a diffusers folder: cannot read its {MODEL_INDEX}: {err}") from None
    if not isinstance(index, dict):
        raise SSPOError(f"{model_url}: its {MODEL_INDEX} holds no pipeline description")
    return index


def model_family(path: Path, model_url: str) -> tuple[str, list, bool]:
    """(family, text encoders to load, zero unconditional) from the folder's model_index.json."""
    index = read_model_index(path, model_url)
    pipeline = index.get("_class_name")
    if pipeline not in FAMILIES:
        raise SSPOError(f"{model_url} holds a {pipeline} model; supported: {', '.join(FAMILIES)}")
    family, encoders = FAMILIES[pipeline]
    return family, encoders, bool(index.get("force_zeros_for_empty_prompt", False))


def is_video_model(model_url: str) -> bool:
    """Whether the model folder holds a video (AnimateDiff) model, read from its model_index.json alone; False when
    that cannot be read (loading the model then says why)."""
    try:
        index = storage.read_json(storage.join(model_url, MODEL_INDEX))
    except (OSError, ValueError, SSPOError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == "AnimateDiffPipeline"


def open_model(model_url: str, needed: tuple[str, ...] = ()) -> tuple[Path, str, list, bool]:
    """(local folder, family, text encoders, zero unconditional) of a model folder that holds a VAE, the family's
    text encoders and tokenizers, and the `needed` subfolders."""
    path = storage.fetch_dir(model_url)
    family, encoders, zero_unconditional = model_family(path, model_url)
    subfolders = ["vae", *(folder for folder, _ in encoders), *tokenizer_folders(encoders), *needed]
    missing = [name for name in subfolders if not (path / name).is_dir()]
    if missing:
        raise SSPOError(f"{model_url} is not a {family} diffusers folder: missing {', '.join(missing)}/")
    return path, family, encoders, zero_unconditional


def tokenizer_folders(encoders: list) -> list[str]:
    return [folder.replace("text_encoder", "tokenizer") for folder, _ in encoders]


def read_encoders(path: Path, family: str, encoders: list) -> Encoders:
    """The VAE and text encoders of the folder, frozen."""
    loaded = Encoders(
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True),
        text_encoders=[kind.from_pretrained(path / folder, use_safetensors=True) for folder, kind in encoders],
        tokenizers=[AutoTokenizer.from_pretrained(path / folder) for folder in tokenizer_folders(encoders)],
        path=path,
        family=family,
    )
    for module in (loaded.vae, *loaded.text_encoders):
        module.requires_grad_(False).eval()
    return loaded


def load_encoders(model_url: str) -> Encoders:
    """The VAE and text encoders of a Stable Diffusion (or SDXL) folder, loaded offline (no UNet)."""
    path, family, encoders, _ = open_model(model_url)
    try:
        return read_encoders(path, family, encoders)
    except (OSError, ValueError, EnvironmentError) as err:
        raise SSPOError(f"cannot load the model at {model_url}: {err}") from None


def encoder_digests(path: Path, family: str) -> dict[str, str]:
    """sha256 of the weights files of a model folder's VAE and text encoders, by path in the folder: what stored
    latents and prompt embeddings depend on. Variant files (`model.fp16.safetensors`), which loading without a
    variant does not read, are left out."""
    encoders = next(encoders for name, encoders in FAMILIES.values() if name == family)
    return {f"{folder}/{file.name}": storage.sha256_file(file)
            for folder in ("vae", *(folder for folder, _ in encoders))
            for file in sorted((path / folder).glob("*.safetensors"))
            if "." not in file.name.removesuffix(".safetensors")}


def load_components(model_url: str) -> Components:
    """The parts of a Stable Diffusion (or SDXL) folder that training and sampling need, loaded offline."""
    path, family, encoders, zero_unconditional = open_model(model_url, ("unet", "scheduler"))
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        unet_class = ClipTextUNetMotionModel if family == "video" else UNet2DConditionModel
        components = Components(
            **vars(read_encoders(path, family, encoders)),
            unet=unet_class.from_pretrained(path, subfolder="unet", use_safetensors=True),
            noise_scheduler=noise_scheduler,
            sample_scheduler=DDIMScheduler.from_config(noise_scheduler.config),
            zero_unconditional=zero_unconditional,
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise SSPOError(f"cannot load the model at {model_url}: {err}") from None
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise SSPOError(f"{model_url}: its scheduler's prediction_type {prediction_type!r} is not supported "
                        f"(use a model that predicts {' or '.join(PREDICTION_TYPES)})")
    return components


def prompt_conditioning(parts: Components, batch: dict) -> Conditioning:
    """The batch's prompts as a generated image's conditioning: the embeddings stored with the dataset when the batch
    holds them (`sspo prepare --encode-with`), else its captions encoded now."""
    hidden, pooled = batch.get("prompt_hidden"), batch.get("prompt_pooled")
    if hidden is None:
        return parts.encode(batch["captions"])
    device = parts.vae.device
    return parts.as_generated(Conditioning(hidden.to(device), None if pooled is None else pooled.to(device)))


def latent_sample(parts: Components, batch: dict, generator: torch.Generator, role: str = "winner") -> torch.Tensor:
    """A sample (unscaled) of the latent distribution of the batch's winners or losers: the distribution stored with
    the dataset when the batch holds it, else the VAE's encoding of the pixels. Both draw their noise from
    `generator` through DiagonalGaussianDistribution.sample, so every later draw of the step is the same either way."""
    prefix = "" if role == "winner" else f"{role}_"
    device = parts.vae.device
    mean = batch.get(f"{prefix}latent_mean")
    if mean is None:
        pixels = batch[f"{prefix}pixels"]
        if pixels.ndim == 4:
            return parts.vae.encode(pixels.to(device)).latent_dist.sample(generator)
        mean, logvar = parts.latent_distribution(pixels)  # clips: drawn in their (B, C, frames, h, w) layout
    else:
        logvar = batch[f"{prefix}latent_logvar"]
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1).to(device)).sample(generator)


def check_encodings(encoded_with: dict, parts: Components, data_url: str, model_url: str) -> None:
    """Refuse latents and prompt embeddings that another VAE or text encoder made than the model's own."""
    made_by = encoded_with.get("weights", {})
    mine = encoder_digests(parts.path, parts.family)
    differing = sorted(name for name in made_by.keys() | mine.keys() if made_by.get(name) != mine.get(name))
    if differing:
        raise SSPOError(
            f"{data_url} holds latents and prompt embeddings made with {encoded_with.get('model')}, whose VAE or text "
            f"encoders differ from those of {storage.absolute(model_url)} ({differing[0]}); prepare it again with "
            f"--encode-with {model_url}, or train with use_encodings: false (--no-use-encodings), which encodes its "
            "pixels and captions each step")


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at these timesteps: the noise (epsilon) or the velocity (v_prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def base_unet_weights(path: Path) -> Path:
    return path / "unet" / "diffusion_pytorch_model.safetensors"


def lora_config(rank: int, alpha: float, train_modules: str = "all") -> LoraConfig:
    """LoRA on the attention projections of the whole UNet, or (`motion`) of a video UNet's motion modules only."""
    targets = MOTION_LORA_TARGETS if train_modules == "motion" else LORA_TARGET_MODULES
    return LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian")


def freeze_for(parts: Components, train_modules: str, model_url: str) -> None:
    """Freeze what `train_modules` leaves out of a full fine-tune: for `motion`, everything but a video UNet's motion
    modules. (LoRA freezes the whole UNet and adds adapters where lora_config says.)"""
    if train_modules == "all":
        return
    if not parts.video:
        raise SSPOError(f"train_modules {train_modules} trains a video model's motion modules, but {model_url} is a "
                        f"{parts.family} model: use train_modules all")
    parts.unet.freeze_unet2d_params()


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


def read_checkpoint(checkpoint_url: str) -> tuple[Path, dict]:
    """(local folder, checkpoint.json) of a checkpoint, its files checked against its manifest."""
    directory = storage.fetch_dir(checkpoint_url)
    storage.verify_dir(directory)
    return directory, read_checkpoint_info(directory, checkpoint_url)


def apply_checkpoint(unet: UNet2DConditionModel, checkpoint_url: str) -> dict:
    """Load a trained checkpoint (full UNet or LoRA adapter) into `unet`; returns its checkpoint.json."""
    directory, info = read_checkpoint(checkpoint_url)
    load_checkpoint(unet, directory, info, checkpoint_url)
    return info


def load_checkpoint(unet: UNet2DConditionModel, directory: Path, info: dict, checkpoint_url: str) -> None:
    """Load the weights of a checkpoint already read (`read_checkpoint`) into `unet`.

    The weights are checked against what checkpoint.json says they are before loading: loading is lenient (an
    adapter's state dict loads with strict=False, so a full UNet file given as an adapter would load nothing).
    """
    try:
        weights = load_file(directory / CHECKPOINT_WEIGHTS)
    except (SafetensorError, OSError) as err:
        raise SSPOError(f"{checkpoint_url}: {CHECKPOINT_WEIGHTS} is not a readable safetensors file: {err}") from None
    if info["kind"] == "lora":
        adapter = lora_config(info["lora_rank"], info["lora_alpha"], info.get("train_modules", "all"))
        unet.add_adapter(adapter, adapter_name="trained")
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


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
