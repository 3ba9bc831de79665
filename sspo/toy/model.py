"""A tiny Stable-Diffusion-shaped (SDXL-shaped, or AnimateDiff-shaped) model built from configs and saved in the
diffusers folder layout.

The toy model and SD-1.x share every code path: AutoencoderKL, CLIPTextModel, a tokenizer, UNet2DConditionModel,
DDPM for training and DDIM for sampling. The SDXL-shaped one adds SDXL's second text encoder (with projection) and
tokenizer, and a UNet conditioned on the pooled text embedding and the time ids. The video one is AnimateDiff's
layout: the SD-shaped UNet with a MotionAdapter's temporal attention after each block (a UNetMotionModel), the same
VAE (frames are encoded as images) and text encoder. The tokenizer is a word-level
`tokenizers` model wrapped in PreTrainedTokenizerFast, so it needs no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, DDPMScheduler, MotionAdapter,
                       UNet2DConditionModel, UNetMotionModel)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from sspo.toy.world import RESOLUTION, vocabulary

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
MAX_TOKENS = 12
FAMILIES = ("sd", "sdxl", "video")
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# Temporal attention's sinusoidal positions cover this many frames: the toy clips' 8 and room to sample longer ones.
MOTION_MAX_FRAMES = 32
# SDXL's added conditioning: each of the six time ids is embedded in this many sinusoidal features.
ADDITION_TIME_EMBED_DIM = 8
POOLED_DIM = 32


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `words` (by default the image world's vocabulary)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + (words or vocabulary()))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, projection_dim: int = 0):
    """A CLIP text encoder; with `projection_dim`, SDXL's second encoder, whose projection is the pooled embedding."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or 512,
    )
    encoder = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    # With the default std-0.02 init, rarely contrasted words (positions) collapse and never get a useful gradient.
    torch.nn.init.normal_(encoder.get_input_embeddings().weight, std=1.0)
    return encoder


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def build_text_encoders(family: str, tokenizer: PreTrainedTokenizerFast) -> list:
    if family == "sdxl":
        return [build_text_encoder(tokenizer), build_text_encoder(tokenizer, projection_dim=POOLED_DIM)]
    return [build_text_encoder(tokenizer)]


def build_unet(latent_size: int, text_encoders: list) -> UNet2DConditionModel:
    """A UNet attending to the concatenated hidden states of `text_encoders`; with two (SDXL), it also takes the
    pooled embedding of the second and the time ids."""
    sdxl = {}
    if len(text_encoders) == 2:
        sdxl = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": 6 * ADDITION_TIME_EMBED_DIM + POOLED_DIM,
        }
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=sum(encoder.config.hidden_size for encoder in text_encoders),
        attention_head_dim=8,
        norm_num_groups=32,
        **sdxl,
    )


def build_motion_unet(latent_size: int, text_encoders: list) -> UNetMotionModel:
    """The SD-shaped UNet with a MotionAdapter's temporal transformers after each of its blocks and in its middle."""
    spatial = build_unet(latent_size, text_encoders)
    adapter = MotionAdapter(
        block_out_channels=spatial.config.block_out_channels,
        motion_layers_per_block=spatial.config.layers_per_block,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=4,
        motion_norm_num_groups=spatial.config.norm_num_groups,
        motion_max_seq_length=MOTION_MAX_FRAMES,
        use_motion_mid_block=True,
    )
    return UNetMotionModel.from_unet2d(spatial, adapter)


def motion_adapter_of(unet: UNetMotionModel) -> MotionAdapter:
    """A MotionAdapter holding the UNet's (trained) motion modules, as UNetMotionModel.save_motion_modules builds it."""
    config = unet.config
    adapter = MotionAdapter(
        block_out_channels=config.block_out_channels,
        motion_layers_per_block=config.layers_per_block,
        motion_norm_num_groups=config.norm_num_groups,
        motion_num_attention_heads=config.motion_num_attention_heads,
        motion_max_seq_length=config.motion_max_seq_length,
        use_motion_mid_block=config.use_motion_mid_block,
    )
    adapter.load_state_dict({name: tensor for name, tensor in unet.state_dict().items() if "motion_modules" in name})
    return adapter


def build_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def save_pipeline_folder(
    directory: Path, vae: AutoencoderKL, text_encoders: list, tokenizer, unet: UNet2DConditionModel, scheduler
) -> None:
    """Write the StableDiffusionPipeline (one text encoder) or StableDiffusionXLPipeline (two) folder that
    diffusers' from_pretrained(dir) loads offline. Both SDXL encoders share the toy tokenizer."""
    directory = Path(directory)
    sdxl = len(text_encoders) == 2
    model_index = {
        "_class_name": PIPELINE_CLASSES["sdxl" if sdxl else "sd"],
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["diffusers", type(unet).__name__],
        "vae": ["diffusers", type(vae).__name__],
    }
    if sdxl:
        model_index["force_zeros_for_empty_prompt"] = True
    else:
        model_index.update({"requires_safety_checker": False, "safety_checker": [None, None]})
    vae.save_pretrained(directory / "vae")
    for index, encoder in enumerate(text_encoders):
        suffix = f"_{index + 1}" if index else ""
        encoder.save_pretrained(directory / f"text_encoder{suffix}")
        tokenizer.save_pretrained(directory / f"tokenizer{suffix}")
        model_index[f"text_encoder{suffix}"] = ["transformers", type(encoder).__name__]
        model_index[f"tokenizer{suffix}"] = ["transformers", type(tokenizer).__name__]
    unet.save_pretrained(directory / "unet")
    scheduler.save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True))


def save_video_pipeline_folder(directory: Path, vae: AutoencoderKL, text_encoder, tokenizer, unet: UNetMotionModel,
                               scheduler: DDPMScheduler) -> None:
    """Write the AnimateDiffPipeline folder that diffusers' from_pretrained(dir) loads offline: unet/ holds the whole
    UNetMotionModel, motion_adapter/ its motion modules alone (as AnimateDiff distributes them)."""
    pipeline = AnimateDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=motion_adapter_of(unet),
        # a sampler the pipeline names; training reads the same schedule as DDPM
        scheduler=DDIMScheduler.from_config(scheduler.config),
    )
    pipeline.save_pretrained(directory, safe_serialization=True)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
