"""Fixed prompts × fixed seeds for the base and the trained model, scored by every chosen scorer.

Base and trained model get the same sampler, steps, guidance and initial noise for each (prompt, seed), so their
images pair up and a win rate compares like with like. Every image is kept as a PNG, listed in index.jsonl with its
prompt, attributes, seed, model and scores, so `rescore` can score a finished run again (say with another reward
model) from those files alone, without loading a diffusion model.

Outputs: metrics.json, table.md, report.md, report.html, grid-<set>.png, plots/<model>.csv, images/, index.jsonl.

A video model (AnimateDiff folder) makes clips of `frames` frames instead: each is kept as a GIF under clips/ (its
frames reduced to a GIF's 256 colours where they hold more; what is scored is what the GIF holds, so `rescore` scores
the same pixels), the toy prompts are the video world's, the oracle is the video oracle, and the grids show each
clip's first, middle and last frames.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
from PIL import Image

from sspo import storage, telemetry
from sspo.config import EvaluateConfig, to_json
from sspo.errors import SSPOError
from sspo.evaluate import prompts as prompt_sets
from sspo.evaluate import report, scorers
from sspo.evaluate.results import ALL, Evaluation
from sspo.run_store import resolve_checkpoint
from sspo.models import apply_checkpoint, is_video_model, load_components
from sspo.prepare import disk_full_as_error
from sspo.progress import Progress
from sspo.sampling import decode_to_uint8, sample_latents
from sspo.toy import video_world
from sspo.toy.world import ATTRIBUTES, Scene
from sspo.train.replay import counter_rng

table = report.table


def initial_noise(seed: int, prompt_index: int, shape: tuple) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(counter_rng(seed, 11, prompt_index).integers(2**62)))
    return torch.randn(shape, generator=generator)


def generate(parts, unet, prompts: list[str], seeds: list[int], cfg: EvaluateConfig, desc: str) -> np.ndarray:
    """uint8 images of shape (len(prompts), len(seeds), H, W, 3), or clips (len(prompts), len(seeds), frames, H, W,
    3) from a video model."""
    frames = (cfg.frames,) if parts.video else ()
    shape = (unet.config.in_channels, *frames, parts.latent_size, parts.latent_size)
    jobs = [(p, s) for p in range(len(prompts)) for s in seeds]
    uncond = parts.unconditional()
    images = []
    progress = Progress(len(jobs), desc)
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        cond = parts.encode([prompts[p] for p, _ in chunk])
        noise = torch.stack([initial_noise(s, p, shape) for p, s in chunk])
        latents = sample_latents(unet, parts.sample_scheduler, cond, uncond, noise, cfg.sample_steps, cfg.guidance)
        images.append(decode_to_uint8(parts.vae, latents).numpy())
        progress.update(len(chunk))
    progress.close()
    return np.concatenate(images).reshape(len(prompts), len(seeds), *images[0].shape[1:])


def score_all(chosen: list[scorers.Scorer], images: list[Image.Image], texts: list[str], scenes: list,
              batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """{scorer: {"score": per-image scores, plus the oracle's per-attribute correctness}}."""
    results = {}
    for scorer in chosen:
        parts = []
        for start in range(0, len(images), batch_size):
            window = slice(start, start + batch_size)
            batch = (images[window], texts[window], scenes[window])
            parts.append({"score": scorer.score(*batch), **scorer.attributes(batch[0], batch[2])})
        results[scorer.name] = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return results


def _json_number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def generated_images(cfg: EvaluateConfig, sets: list[prompt_sets.PromptSet]) -> tuple[dict, dict]:
    """Sample every prompt set with the base (and the trained) model: ({(model, split): uint8 array}, provenance)."""
    parts = load_components(cfg.model)
    if parts.video and cfg.frames > parts.unet.config.motion_max_seq_length:
        raise SSPOError(f"frames {cfg.frames} is more than the {parts.unet.config.motion_max_seq_length} frames the "
                        f"motion modules of {cfg.model} know positions for")
    unets = {"base": parts.unet.eval()}
    checkpoint = None
    if cfg.checkpoint:
        checkpoint = resolve_checkpoint(cfg.checkpoint)
        unets["trained"] = copy.deepcopy(parts.unet)
        apply_checkpoint(unets["trained"], checkpoint)
        unets["trained"].eval()
    images = {(model, s.name): generate(parts, unet, s.prompts, cfg.seeds, cfg, desc=f"evaluate {model} {s.name}")
              for s in sets for model, unet in unets.items()}
    provenance = {
        "model": cfg.model,
        "checkpoint": checkpoint,
        "sampler": {"scheduler": type(parts.sample_scheduler).__name__, "steps": cfg.sample_steps,
                    "guidance": cfg.guidance, "seeds": cfg.seeds, "latent_size": parts.latent_size,
                    **({"frames": cfg.frames} if parts.video else {})},
        "prompt_sets": {s.name: {"source": spec, "prompts": len(s.prompts)} for s, spec in zip(sets, cfg.prompts)},
    }
    return images, provenance


def saved_images(url: str) -> tuple[list[prompt_sets.PromptSet], dict, dict]:
    """A finished evaluation's prompt sets, images and provenance, read back from its index.jsonl and PNGs."""
    previous = Evaluation.read(url)
    directory = storage.fetch_dir(url)
    try:
        rows = [json.loads(line) for line in (directory / "index.jsonl").read_text().splitlines()]
    except (OSError, ValueError) as err:
        raise SSPOError(f"not a finished evaluation: {url} ({err})") from err
    recorded = previous.data
    seeds = recorded["sampler"]["seeds"]
    sets, images = [], {}
    for split in previous.splits:
        for model in previous.models:
            # index.jsonl lists each (model, split) prompt-major, seed-minor: the order the images were generated in
            listed = [row for row in rows if row["split"] == split and row["model"] == model]
            pixels = np.stack([saved_pixels(directory / row["file"]) for row in listed])
            images[model, split] = pixels.reshape(len(listed) // len(seeds), len(seeds), *pixels.shape[1:])
        per_prompt = listed[:: len(seeds)]
        scenes = [scene_of(row) for row in per_prompt]
        sets.append(prompt_sets.PromptSet(split, [row["prompt"] for row in per_prompt], scenes))
    provenance = {key: recorded[key] for key in ("checkpoint", "sampler", "prompt_sets")}
    # evaluations written before "model" was recorded at the top level have it only in their config
    provenance["model"] = recorded.get("model", recorded["config"]["model"])
    return sets, images, provenance | {"rescored_from": url}


def saved_pixels(path) -> np.ndarray:
    if path.suffix == ".gif":
        return video_world.read_clip(path)
    return np.asarray(Image.open(path).convert("RGB"))


def scene_of(row: dict) -> Scene | video_world.VideoScene | None:
    """The toy scene an index.jsonl row records, None for a prompt outside the toy worlds."""
    if "direction" in row:
        return video_world.VideoScene(**{a: row[a] for a in video_world.ATTRIBUTES})
    if "color" in row:
        return Scene(**{a: row[a] for a in ATTRIBUTES})
    return None


def as_gif_colors(clip: np.ndarray) -> np.ndarray:
    """The clip as a GIF holds it: each frame with more than 256 colours reduced to 256 (median cut, no dither)."""
    frames = []
    for frame in clip:
        if len(np.unique(frame.reshape(-1, 3), axis=0)) > 256:
            reduced = Image.fromarray(frame).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            frame = np.asarray(reduced.convert("RGB"))
        frames.append(frame)
    return np.stack(frames)


def frame_grid(texts: list[str], models: list[str], seeds: list, images: dict, split: str) -> Image.Image:
    """One row per prompt; per (model, seed) its clip's first, middle and last frames."""
    picks = {"first": 0, "middle": None, "last": -1}
    columns = [f"{model} s{seed} {pick}" for model in models for seed in seeds for pick in picks]
    tiles = []
    for model in models:
        clips = images[model, split][:len(texts)]  # (prompts, seeds, frames, H, W, 3)
        chosen = [0, clips.shape[2] // 2, clips.shape[2] - 1]
        tiles.append(clips[:, :, chosen].reshape(len(clips), len(seeds) * len(chosen), *clips.shape[3:]))
    return report.grid(texts, columns, np.concatenate(tiles, axis=1))


def evaluate(cfg: EvaluateConfig) -> Evaluation:
    # Entered first, so an existing output (or a failed run's leftover) is refused before any model is loaded.
    with disk_full_as_error(cfg.output), storage.staged_output(cfg.output) as (staging, manifest_extra):
        video = not cfg.rescore and is_video_model(cfg.model)
        chosen = [scorers.build(name, cfg.scorer_paths) for name in cfg.scorers]
        if cfg.rescore:
            sets, images, provenance = saved_images(cfg.rescore)
            video = next(iter(images.values())).ndim == 6  # (prompts, seeds, frames, H, W, 3)
        else:
            sets = prompt_sets.load_all(cfg.prompts, cfg.max_prompts, video)
            images, provenance = generated_images(cfg, sets)
        if video:
            images = {key: np.stack([[as_gif_colors(clip) for clip in row] for row in clips])
                      for key, clips in images.items()}
            chosen = [scorer if scorer.name == "oracle" else scorers.PerFrameScorer(scorer) for scorer in chosen]
        models = list(dict.fromkeys(model for model, _ in images))
        seeds = provenance["sampler"]["seeds"]
        results = Evaluation.new({"config": json.loads(to_json(cfg)), **provenance}, cfg.scorers,
                                 [s.name for s in sets], models)
        index_rows = []
        scores: dict = {}  # (model, split) -> score_all() result
        for prompt_set in sets:
            split, texts = prompt_set.name, prompt_set.prompts
            for model in models:
                if video:
                    samples = [clip for row in images[model, split] for clip in row]
                else:
                    samples = [Image.fromarray(image) for row in images[model, split] for image in row]
                flat_texts = [t for t in texts for _ in seeds]
                flat_scenes = [scene for scene in prompt_set.scenes for _ in seeds]
                result = score_all(chosen, samples, flat_texts, flat_scenes, cfg.batch_size)
                scores[model, split] = result
                results.add_scores(model, split, {name: report.summarize(by_key) for name, by_key in result.items()})
                for i, sample in enumerate(samples):
                    p, s = divmod(i, len(seeds))
                    folder, suffix = ("clips", "gif") if video else ("images", "png")
                    file = f"{folder}/{model}/{split}/{p:04d}-seed{seeds[s]}.{suffix}"
                    (staging / file).parent.mkdir(parents=True, exist_ok=True)
                    if video:
                        video_world.write_clip(sample, staging / file)
                    else:
                        sample.save(staging / file)
                    scene = prompt_set.scenes[p]
                    index_rows.append({
                        "file": file, "model": model, "split": split, "prompt": texts[p],
                        **(scene.as_dict() if scene else {}), "seed": seeds[s],
                        "scores": {name: {key: _json_number(values[i]) for key, values in by_key.items()}
                                   for name, by_key in result.items()},
                    })
            shown = cfg.grid_prompts or len(texts)
            if video:
                frame_grid(texts[:shown], models, seeds, images, split).save(staging / f"grid-{split}.png")
            else:
                columns = [f"{model} s{seed}" for model in models for seed in seeds]
                tiles = np.concatenate([images[model, split][:shown] for model in models], axis=1)
                report.grid(texts[:shown], columns, tiles).save(staging / f"grid-{split}.png")

        if "trained" in models:
            for name in cfg.scorers:
                pairs = {split: (scores["trained", split][name]["score"], scores["base", split][name]["score"])
                         for split in results.splits}
                pairs[ALL] = tuple(np.concatenate([pair[i] for pair in pairs.values()]) for i in (0, 1))
                for split, (trained, base) in pairs.items():
                    results.add_win_rate(name, split,
                                         report.win_rate(trained, base, cfg.bootstrap_samples, cfg.bootstrap_seed))

        with open(staging / "index.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in index_rows)
        report.write_plots(staging, index_rows, list(cfg.scorers))
        results.write(staging)
        (staging / "table.md").write_text(report.table(results))
        (staging / "report.md").write_text(report.markdown(results))
        (staging / "report.html").write_text(report.html_report(results, staging))
        manifest_extra["scorers"] = list(cfg.scorers)
    telemetry.record_evaluation(results)
    return results
