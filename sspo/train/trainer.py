"""The training loop: SSPO (and the sft, dpo, spin baselines) on a diffusers SD-1.x/2.x model.

Read it top to bottom: set-up, resume, then one optimizer step per loop iteration. All randomness (data order,
timesteps, noise, replay draws, self-sample noise) comes from generators keyed by (seed, step, micro-step, rank),
so a resumed run repeats exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sspo import objectives, storage, telemetry
from sspo.config import TrainConfig, to_json
from sspo.errors import SSPOError
from sspo.checkpoints import CHECKPOINT_INFO, CHECKPOINT_WEIGHTS, latest_checkpoint, resolve_checkpoint
from sspo.models import apply_checkpoint, base_unet_weights, load_components, lora_config, per_sample_error
from sspo.prepare import ShardDataset
from sspo.progress import Progress
from sspo.sampling import encode_prompts, sample_latents
from sspo.train.checkpoint import checkpoint_name, read_training_state, write_checkpoint
from sspo.train.replay import BASE, FullReference, LoraReference, counter_rng, draw_index, load_safetensors

log = logging.getLogger(__name__)


def torch_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(counter_rng(*keys).integers(2**62)))


def batch_indices(num_samples: int, seed: int, position: int, batch_size: int) -> list[int]:
    """Samples `position .. position+batch_size` of an endless stream of seeded per-epoch permutations."""
    indices = []
    for p in range(position, position + batch_size):
        epoch, offset = divmod(p, num_samples)
        indices.append(int(counter_rng(seed, 3, epoch).permutation(num_samples)[offset]))
    return indices


def run_folder(output: str) -> Path:
    """Where this process stages files before they are published to `output`."""
    if storage.is_local(output):
        return storage.local_path(output)
    return storage.cache_root() / "runs" / hashlib.sha256(output.encode()).hexdigest()[:16]


def replay_entries(cfg: TrainConfig) -> list[str]:
    """The `replay_from` entries as checkpoint URLs; each must hold weights of this run's kind (and LoRA shape)."""

    def describe(kind: str, rank: int, alpha: float) -> str:
        return f"a LoRA adapter (rank {rank}, alpha {alpha:g})" if kind == "lora" else "full UNet weights"

    wanted = describe("lora" if cfg.lora_rank else "full", cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank)
    entries = []
    for url in cfg.replay_from:
        checkpoint = resolve_checkpoint(url)
        info = storage.read_json(storage.join(checkpoint, CHECKPOINT_INFO))
        found = describe(info.get("kind"), info.get("lora_rank", 0), info.get("lora_alpha", 0))
        if found != wanted:
            raise SSPOError(f"replay_from entry {url} holds {found}, but this run needs {wanted}")
        entries.append(checkpoint)
    return entries


def train(cfg: TrainConfig) -> dict:
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    expected_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected_processes:
        raise SSPOError(
            f"{expected_processes} processes were launched but only {accelerator.num_processes} joined the "
            "process group; each would train alone and overwrite the others' checkpoints"
        )
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    is_main = accelerator.is_main_process
    local_dir = run_folder(cfg.output)
    checkpoints_url = storage.join(cfg.output, "checkpoints")

    # -- data
    data = ShardDataset(cfg.data, split=cfg.data_split or None)
    if cfg.objective == "dpo" and data.losers is None:
        raise SSPOError(f"objective=dpo needs paired data: prepare {cfg.data} with --keep-pairs")

    # -- model, reference and optimizer
    parts = load_components(cfg.model)
    parts.vae.to(device)
    parts.text_encoder.to(device)
    unet = parts.unet
    torch.manual_seed(cfg.seed)

    def load_entry(entry: str) -> dict:
        """Weights of a replay pool entry: θ₀'s UNet file, or a checkpoint's unet.safetensors."""
        if entry == BASE:
            return load_safetensors(base_unet_weights(parts.path))
        return load_safetensors(storage.fetch_dir(entry) / CHECKPOINT_WEIGHTS)

    if cfg.lora_rank:
        unet.requires_grad_(False)
        adapter = lora_config(cfg.lora_rank, cfg.lora_alpha)
        unet.add_adapter(adapter, adapter_name="default")
        reference = LoraReference(unet, adapter, load_entry)
    else:
        reference = FullReference(copy.deepcopy(unet).to(device), cfg.replay_cache_size, load_entry)
    unet.to(device).train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(
        cfg.lr_schedule, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
    )

    # -- resume from the latest completely published checkpoint
    step = 0
    latest = latest_checkpoint(checkpoints_url)
    if latest is not None:
        directory = storage.fetch_dir(latest)
        storage.verify_dir(directory)
        state, optimizer_state = read_training_state(directory)
        if state["kind"] != ("lora" if cfg.lora_rank else "full"):
            raise SSPOError(f"{cfg.output} holds a {state['kind']} run; use a new output or the same lora_rank")
        if cfg.lora_rank:
            set_peft_model_state_dict(unet, load_safetensors(directory / CHECKPOINT_WEIGHTS), adapter_name="default")
        else:
            apply_checkpoint(unet, latest)
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        step, pool = state["step"], state["pool"]
        log.info("resuming %s at step %d with a replay pool of %d", cfg.output, step, len(pool))
    else:
        pool = [BASE, *replay_entries(cfg)]

    unet, optimizer = accelerator.prepare(unet, optimizer)
    if is_main:
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / "config.json").write_text(to_json(cfg))
    uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [""])
    scaling = parts.vae.config.scaling_factor
    num_timesteps = parts.noise_scheduler.config.num_train_timesteps

    def micro_step(step: int, micro: int) -> tuple[torch.Tensor, dict]:
        position = ((step * cfg.gradient_accumulation_steps + micro) * world_size + rank) * cfg.batch_size
        batch = data.batch(batch_indices(len(data), cfg.seed, position, cfg.batch_size))
        generator = torch_generator(cfg.seed, 5, step, micro, rank)

        def randn(shape) -> torch.Tensor:
            return torch.randn(shape, generator=generator).to(device)

        def timesteps(n: int) -> torch.Tensor:
            return torch.randint(num_timesteps, (n,), generator=generator).to(device)

        with torch.no_grad():
            cond = encode_prompts(parts.tokenizer, parts.text_encoder, batch["captions"])
            winner = parts.vae.encode(batch["pixels"].to(device)).latent_dist.sample(generator) * scaling
        if cfg.objective == "sft":
            noise, t = randn(winner.shape), timesteps(len(winner))
            prediction = unet(parts.noise_scheduler.add_noise(winner, noise, t), t, cond).sample
            return objectives.sft_loss(per_sample_error(prediction, noise))

        index = {"dpo": 0, "spin": len(pool) - 1}.get(cfg.objective)
        if index is None:
            index = draw_index(cfg.replay, len(pool), cfg.seed, step, micro)
        reference.activate(pool[index])
        upcoming = (step, micro + 1) if micro + 1 < cfg.gradient_accumulation_steps else (step + 1, 0)
        if cfg.objective == "sspo":
            reference.prefetch(pool[draw_index(cfg.replay, len(pool), cfg.seed, *upcoming)])

        with torch.no_grad(), reference.model() as reference_unet:
            if cfg.objective == "dpo":
                other = parts.vae.encode(batch["loser_pixels"].to(device)).latent_dist.sample(generator) * scaling
            else:
                other = sample_latents(
                    reference_unet, parts.sample_scheduler, cond, uncond, randn(winner.shape),
                    cfg.sample_steps, cfg.guidance,
                )
            noise_w, t_w = randn(winner.shape), timesteps(len(winner))
            noise_o, t_o = (noise_w, t_w) if cfg.shared_noise else (randn(winner.shape), timesteps(len(winner)))
            noisy = torch.cat([parts.noise_scheduler.add_noise(winner, noise_w, t_w),
                               parts.noise_scheduler.add_noise(other, noise_o, t_o)])
            t, noise, context = torch.cat([t_w, t_o]), torch.cat([noise_w, noise_o]), torch.cat([cond, cond])
            err_w_ref, err_o_ref = per_sample_error(reference_unet(noisy, t, context).sample, noise).chunk(2)
        err_w, err_o = per_sample_error(unet(noisy, t, context).sample, noise).chunk(2)
        if cfg.objective == "sspo":
            loss, stats = objectives.sspo_loss(err_w, err_w_ref, err_o, err_o_ref, cfg.beta, ssr=cfg.ssr)
        else:
            loss, stats = objectives.dpo_loss(err_w, err_w_ref, err_o, err_o_ref, cfg.beta)
        return loss, {**stats, "ref_index": index}

    def save(step: int, pool: list[str]) -> list[str]:
        name = checkpoint_name(step)
        url = storage.join(checkpoints_url, name)
        grows_pool = step % cfg.save_every == 0
        pool_after = [*pool, url] if grows_pool else pool
        if is_main:
            model = accelerator.unwrap_model(unet)
            weights = get_peft_model_state_dict(model, adapter_name="default") if cfg.lora_rank else model.state_dict()
            info = {
                "kind": "lora" if cfg.lora_rank else "full",
                "lora_rank": cfg.lora_rank,
                "lora_alpha": cfg.lora_alpha or cfg.lora_rank,
                "step": step,
                "base_model": cfg.model,
                "data": cfg.data,
                "objective": cfg.objective,
            }
            state = {
                "step": step,
                "kind": info["kind"],
                "pool": pool_after,
                "lr_scheduler": lr_scheduler.state_dict(),
                "seed": cfg.seed,
            }
            staging = local_dir / "checkpoints" / name
            write_checkpoint(staging, weights, info, optimizer.state_dict(), state)
            with telemetry.checkpoint_publish_seconds.time():
                storage.publish_dir(staging, url)
        accelerator.wait_for_everyone()
        return pool_after

    log_file = open(local_dir / "train_log.jsonl", "a") if is_main else None
    progress = Progress(cfg.steps, f"train {cfg.objective}", initial=step, enabled=is_main)
    last_stats: dict = {}
    while step < cfg.steps:
        started = time.perf_counter()
        step_stats: list[dict] = []
        for micro in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(unet), accelerator.autocast():
                loss, stats = micro_step(step, micro)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_stats.append({"loss": loss.item(), **stats})
        lr_scheduler.step()
        step += 1
        last_stats = {key: float(np.mean([s[key] for s in step_stats])) for key in step_stats[0]}
        last_stats = {"step": step, **last_stats, "lr": lr_scheduler.get_last_lr()[0],
                      "seconds": time.perf_counter() - started}
        if is_main:
            log_file.write(json.dumps(last_stats) + "\n")
            log_file.flush()
            telemetry.record_step(last_stats, cfg.batch_size * cfg.gradient_accumulation_steps * world_size)
        progress.update(1, **{k: v for k, v in last_stats.items() if k in ("loss", "ssr_rate", "seconds")})
        if step % cfg.save_every == 0 or step == cfg.steps:
            pool = save(step, pool)
    progress.close()
    if isinstance(reference, FullReference):
        reference.close()
    if is_main:
        log_file.close()
        summary = {"final_step": step, "checkpoint": storage.join(checkpoints_url, checkpoint_name(step)),
                   "pool_size": len(pool), **{f"final_{k}": v for k, v in last_stats.items() if k != "step"}}
        (local_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        # the same log as one JSON array, a format `dvc plots` reads (it does not read JSON lines)
        rows = [json.loads(line) for line in (local_dir / "train_log.jsonl").read_text().splitlines()]
        (local_dir / "train_log.json").write_text(json.dumps(rows))
        if not storage.is_local(cfg.output):
            fs, remote = storage.filesystem(cfg.output)
            for name in ("config.json", "train_log.jsonl", "train_log.json", "metrics.json"):
                fs.put_file(str(local_dir / name), storage.join(remote, name))
        return summary
    return {}
