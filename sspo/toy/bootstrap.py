"""Pretrain the tiny SD model (or its video sibling) on the toy world: first the VAE, then the UNet and text encoder
on noisy captions.

Caption noise is *systematic*: a fraction of the images of each attribute value are captioned with the next value
in a fixed cycle (red→green→blue→yellow→red; left→right→up→down→left for the video world's directions). Random
noise averages out under classifier-free guidance; a consistent bias does not, so the base model is imperfectly
aligned the way a web-trained model is.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sspo import storage
from sspo.conditioning import Conditioning, encode_text, time_ids, uncropped_geometry
from sspo.config import BootstrapConfig
from sspo.errors import SSPOError
from sspo.models import denoising_target
from sspo.progress import Progress
from sspo.toy import model as toy_model
from sspo.toy import video_world
from sspo.toy.world import COLORS, POSITIONS, RESOLUTION, SHAPES, Scene

log = logging.getLogger(__name__)

CYCLES = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS),
          "direction": list(video_world.DIRECTIONS)}


def corrupt_scene(scene, noise: dict[str, float], rng: np.random.Generator):
    """The scene (an image world Scene or a VideoScene) with each attribute moved along its cycle at its rate."""
    values = scene.as_dict()
    for attribute, rate in noise.items():
        if rate > 0 and rng.random() < rate:
            cycle = CYCLES[attribute]
            values[attribute] = cycle[(cycle.index(values[attribute]) + 1) % len(cycle)]
    return type(scene)(**values)


def load_world(world_dir: Path) -> tuple[torch.Tensor, list[Scene]]:
    rows = [json.loads(line) for line in (world_dir / "metadata.jsonl").read_text().splitlines() if line]
    if rows and "position" not in rows[0]:
        raise SSPOError(f"{world_dir} holds the video world; bootstrap it with --family video")
    pixels = np.stack([np.asarray(Image.open(world_dir / row["file"]).convert("RGB")) for row in rows])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    scenes = [Scene(row["color"], row["shape"], row["position"]) for row in rows]
    return images, scenes


def load_video_world(world_dir: Path) -> tuple[torch.Tensor, list[video_world.VideoScene]]:
    """The video world's clips as (clips, frames, 3, H, W) in [-1, 1], and their scenes."""
    metadata = world_dir / "metadata.jsonl"
    if not metadata.is_file():
        raise SSPOError(f"{world_dir} holds no metadata.jsonl: render it with `sspo world --video`")
    rows = [json.loads(line) for line in metadata.read_text().splitlines() if line]
    if rows and "direction" not in rows[0]:
        raise SSPOError(f"{world_dir} holds the image world; the video family needs `sspo world --video`")
    clips = np.stack([video_world.read_clip(world_dir / row["file"]) for row in rows])
    videos = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    scenes = [video_world.VideoScene(row["color"], row["shape"], row["direction"]) for row in rows]
    return videos, scenes


def train_vae(vae, images: torch.Tensor, cfg: BootstrapConfig, generator: torch.Generator) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    progress = Progress(cfg.vae_steps, "bootstrap vae")
    for _ in range(cfg.vae_steps):
        batch = images[torch.randint(len(images), (cfg.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update(loss=loss.item())
    progress.close()
    return loss.item()


def train_denoiser(unet, text_encoders, tokenizer, scheduler, latent_mean, latent_std, captions, cfg, generator):
    """Train the UNet and its text encoders together. Dropped captions teach the unconditional branch that
    classifier-free guidance needs: the empty prompt for SD, zero embeddings for SDXL (its pipeline's default)."""
    parameters = list(unet.parameters()) + [p for encoder in text_encoders for p in encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.unet_lr, weight_decay=0.0)
    sdxl = len(text_encoders) == 2
    progress = Progress(cfg.unet_steps, "bootstrap unet")
    for _ in range(cfg.unet_steps):
        index = torch.randint(len(captions), (cfg.unet_batch_size,), generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
        dropped = torch.rand(len(index), generator=generator) < cfg.uncond_prob
        texts = [captions[i] for i in index.tolist()]
        if not sdxl:
            texts = ["" if drop else text for text, drop in zip(texts, dropped.tolist())]
        cond = encode_text(text_encoders, [tokenizer] * len(text_encoders), texts)
        if sdxl:
            kept = (~dropped).float()
            cond = Conditioning(cond.hidden * kept[:, None, None], cond.pooled * kept[:, None])
        cond = cond.with_time_ids(time_ids(uncropped_geometry(len(index), RESOLUTION), RESOLUTION))
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if latents.ndim == 5:  # (B, C, frames, h, w): the motion UNet takes the text of every frame
            cond = Conditioning(cond.hidden.repeat_interleave(latents.shape[2], dim=0))
        prediction = unet(noisy, timesteps, **cond.unet_kwargs()).sample
        loss = torch.nn.functional.mse_loss(prediction, denoising_target(scheduler, latents, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        progress.update(loss=loss.item())
    progress.close()
    return loss.item()


def bootstrap(cfg: BootstrapConfig, staging: Path) -> dict:
    """Build and pretrain the toy model into `staging` (a diffusers folder); returns a summary."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    video = cfg.family == "video"
    world_dir = storage.fetch_dir(cfg.world)
    if video:
        clips, scenes = load_video_world(world_dir)
        images = clips.flatten(0, 1)  # the VAE learns frames as images
    else:
        images, scenes = load_world(world_dir)

    vae = toy_model.build_vae()
    vae_loss = train_vae(vae, images, cfg, generator)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
    latent_mean = torch.cat([p.mean for p in posteriors])
    latent_std = torch.cat([p.std for p in posteriors])
    if video:  # (clips·frames, C, h, w) → (clips, C, frames, h, w), the video UNets' layout
        latent_mean, latent_std = (latents.unflatten(0, clips.shape[:2]).transpose(1, 2)
                                   for latents in (latent_mean, latent_std))
    # Same role as SD's 0.18215: latents of unit variance for the noise schedule.
    scaling_factor = float(1.0 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    vae_seconds = time.perf_counter() - started

    noise = {"color": cfg.caption_noise_color, "shape": cfg.caption_noise_shape,
             **({"direction": cfg.caption_noise_direction} if video else {"position": cfg.caption_noise_position})}
    rng = np.random.default_rng(cfg.seed)
    captions = [corrupt_scene(scene, noise, rng).prompt for scene in scenes]
    tokenizer = toy_model.build_tokenizer(video_world.vocabulary() if video else None)
    text_encoders = toy_model.build_text_encoders(cfg.family, tokenizer)
    build = toy_model.build_motion_unet if video else toy_model.build_unet
    unet = build(latent_mean.shape[-1], text_encoders)
    scheduler = toy_model.build_noise_scheduler(cfg.prediction_type)
    unet_loss = train_denoiser(
        unet,
        text_encoders,
        tokenizer,
        scheduler,
        latent_mean * scaling_factor,
        latent_std * scaling_factor,
        captions,
        cfg,
        generator,
    )
    if video:
        toy_model.save_video_pipeline_folder(staging, vae, text_encoders[0], tokenizer, unet, scheduler)
    else:
        toy_model.save_pipeline_folder(staging, vae, text_encoders, tokenizer, unet, scheduler)
    wrong = sum(c != s.prompt for c, s in zip(captions, scenes)) / len(scenes)
    return {
        "vae_final_loss": vae_loss,
        "unet_final_loss": unet_loss,
        "scaling_factor": scaling_factor,
        "wrong_caption_fraction": wrong,
        "vae_seconds": round(vae_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
