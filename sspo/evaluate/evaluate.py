"""Fixed prompts × fixed seeds for the base and the trained model, scored by the toy oracle.

Base and trained model get the same initial noise for each (prompt, seed), so their images pair up and a win rate
compares like with like. Every image is kept as a PNG with a JSONL index, so any run can be re-scored later.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import torch
from PIL import Image, ImageDraw

from sspo import storage
from sspo.config import EvaluateConfig, to_json
from sspo.models import apply_checkpoint, load_components, resolve_checkpoint
from sspo.progress import Progress
from sspo.sampling import decode_to_uint8, encode_prompts, sample_latents
from sspo.toy import oracle
from sspo.toy.world import ATTRIBUTES, split_scenes
from sspo.train.replay import counter_rng

log = logging.getLogger(__name__)
SPLITS = ("train", "heldout")


def initial_noise(seed: int, prompt_index: int, shape: tuple) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(counter_rng(seed, 11, prompt_index).integers(2**62)))
    return torch.randn(shape, generator=generator)


def generate(parts, unet, prompts: list[str], seeds: list[int], cfg: EvaluateConfig, desc: str) -> np.ndarray:
    """uint8 images of shape (len(prompts), len(seeds), H, W, 3)."""
    shape = (unet.config.in_channels, parts.latent_size, parts.latent_size)
    jobs = [(p, s) for p in range(len(prompts)) for s in seeds]
    uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [""])
    images = []
    progress = Progress(len(jobs), desc)
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        cond = encode_prompts(parts.tokenizer, parts.text_encoder, [prompts[p] for p, _ in chunk])
        noise = torch.stack([initial_noise(s, p, shape) for p, s in chunk])
        latents = sample_latents(unet, parts.sample_scheduler, cond, uncond, noise, cfg.sample_steps, cfg.guidance)
        images.append(decode_to_uint8(parts.vae, latents).numpy())
        progress.update(len(chunk))
    progress.close()
    return np.concatenate(images).reshape(len(prompts), len(seeds), *images[0].shape[1:])


def grid(rows: list[str], columns: list[str], images: np.ndarray, scale: int = 3) -> Image.Image:
    """A labelled grid: one row per prompt, one column per (model, seed); `images` is (rows, columns, H, W, 3)."""
    size = images.shape[2] * scale
    label_width, header = 200, 16
    canvas = Image.new("RGB", (label_width + size * len(columns), header + size * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((label_width + c * size + 2, 2), name, fill="black")
    for r, prompt in enumerate(rows):
        draw.text((4, header + r * size + size // 2 - 5), prompt, fill="black")
        for c in range(len(columns)):
            tile = Image.fromarray(images[r, c]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_width + c * size, header + r * size))
    return canvas


def summarize(scores: list[dict]) -> dict:
    keys = ("score", *ATTRIBUTES)
    return {key: float(np.mean([s[key] for s in scores])) for key in keys} | {"n": len(scores)}


def evaluate(cfg: EvaluateConfig) -> dict:
    parts = load_components(cfg.model)
    unets = {"base": parts.unet.eval()}
    checkpoint = None
    if cfg.checkpoint:
        checkpoint = resolve_checkpoint(cfg.checkpoint)
        unets["trained"] = copy.deepcopy(parts.unet)
        apply_checkpoint(unets["trained"], checkpoint)
        unets["trained"].eval()

    metrics: dict = {"models": {}, "checkpoint": checkpoint, "config": json.loads(to_json(cfg))}
    index_rows, per_image = [], {}
    with storage.staged_output(cfg.output) as (staging, manifest_extra):
        for split in SPLITS:
            scenes = split_scenes(split)
            prompts = [scene.prompt for scene in scenes]
            images = {}
            for name, unet in unets.items():
                images[name] = generate(parts, unet, prompts, cfg.seeds, cfg, desc=f"evaluate {name} {split}")
                scores = []
                for p, scene in enumerate(scenes):
                    for s, seed in enumerate(cfg.seeds):
                        result = oracle.score(images[name][p, s], scene)
                        file = f"images/{name}/{split}/{p:03d}-seed{seed}.png"
                        (staging / file).parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(images[name][p, s]).save(staging / file)
                        index_rows.append({"file": file, "model": name, "split": split, "prompt": prompts[p],
                                           **scene.as_dict(), "seed": seed, "scores": {"oracle": result}})
                        per_image[(name, split, p, seed)] = result["score"]
                        scores.append(result)
                metrics["models"].setdefault(name, {})[split] = summarize(scores)
            columns = [f"{name} s{seed}" for name in unets for seed in cfg.seeds]
            tiles = np.concatenate([images[name] for name in unets], axis=1)
            grid(prompts, columns, tiles).save(staging / f"grid-{split}.png")
            if "trained" in unets:
                outcomes = [
                    np.sign(per_image[("trained", split, p, seed)] - per_image[("base", split, p, seed)])
                    for p in range(len(scenes)) for seed in cfg.seeds
                ]
                metrics.setdefault("win_rate", {})[split] = float(np.mean([(o + 1) / 2 for o in outcomes]))
        with open(staging / "index.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in index_rows)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (staging / "table.md").write_text(table(metrics))
    return metrics


def table(metrics: dict) -> str:
    """Markdown table of oracle scores (mean of colour, shape, position) per model and split."""
    lines = ["| model | train prompts | held-out prompts |", "|---|---|---|"]
    for name, splits in metrics["models"].items():
        lines.append(f"| {name} | {splits['train']['score']:.3f} | {splits['heldout']['score']:.3f} |")
    if "win_rate" in metrics:
        rates = metrics["win_rate"]
        lines.append(f"| win rate trained vs base | {rates['train']:.3f} | {rates['heldout']:.3f} |")
    return "\n".join(lines) + "\n"
