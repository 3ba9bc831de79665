"""The training loop: SSPO (and the sft, dpo, spin baselines) on a diffusers SD-1.x/2.x or SDXL model.

Read it top to bottom: `Trainer.__init__` sets up data, model, reference and optimizer and resumes from the latest
checkpoint; `run` does one optimizer step per loop iteration, each made of `micro_step`s, and `save`s a checkpoint
every `save_every` steps. What an objective trains on (its reference, its losing image, its loss) is one entry of
`sspo.objectives.OBJECTIVES`. All randomness (data order, timesteps, noise, replay draws, self-sample noise) comes
from generators keyed by (seed, step, slot): a step's effective batch is `batch_size × gradient_accumulation_steps ×
processes` samples in slots of `batch_size`, and process r of W takes slots r, W + r, 2W + r, ... as its micro-steps.
So a resumed run repeats exactly what an uninterrupted run would have done, even on another number of processes with
the same effective batch.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import math
import os
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from diffusers.optimization import get_scheduler
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sspo import faults, objectives, storage, telemetry
from sspo.config import TrainConfig, to_json
from sspo.cpu import configure_threads
from sspo.errors import SSPOError
from sspo.models import (base_unet_weights, check_encodings, denoising_target, freeze_for, latent_sample,
                         load_components, lora_config, per_sample_error, prompt_conditioning)
from sspo.progress import Progress
from sspo.run_store import CHECKPOINT_INFO, CHECKPOINT_WEIGHTS, RunStore, checkpoint_files, resolve_checkpoint
from sspo.sampling import make_sampler, sample_latents
from sspo.train.checkpoint import read_training_state, write_checkpoint
from sspo.train.data import ShardDataset
from sspo.train.publisher import CheckpointPublisher, cpu_snapshot
from sspo.train.replay import BASE, FullReference, LoraReference, counter_rng, draw_index, load_safetensors

log = logging.getLogger(__name__)


def torch_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(counter_rng(*keys).integers(2**62)))


def samples_digest(ids: torch.Tensor) -> str:
    """A short digest of the samples one step trained on, whatever processes read them in whatever order."""
    return hashlib.sha256(np.sort(ids.cpu().numpy().astype(np.int64)).tobytes()).hexdigest()[:16]


def weights_kind(cfg: TrainConfig) -> str:
    return "lora" if cfg.lora_rank else "full"


def checkpoint_of_this_kind(cfg: TrainConfig, url: str, setting: str) -> str:
    """The absolute URL of the checkpoint `url` names, which must hold weights of this run's kind (and LoRA shape)."""

    def describe(kind: str, rank: int, alpha: float) -> str:
        return f"a LoRA adapter (rank {rank}, alpha {alpha:g})" if kind == "lora" else "full UNet weights"

    wanted = describe(weights_kind(cfg), cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank)
    checkpoint = resolve_checkpoint(url)
    info = storage.read_json(storage.join(checkpoint, CHECKPOINT_INFO))
    found = describe(info.get("kind"), info.get("lora_rank", 0), info.get("lora_alpha", 0))
    if found != wanted:
        raise SSPOError(f"{setting} {url} holds {found}, but this run needs {wanted}")
    return storage.absolute(checkpoint)


def load_weights(unet, weights: dict, lora_rank: int) -> None:
    if lora_rank:
        set_peft_model_state_dict(unet, weights, adapter_name="default")
    else:
        unet.load_state_dict(weights)


def training_device(requested: str) -> bool:
    """Whether to train on the CPU; asked for CUDA without a CUDA device, the run does not start."""
    if requested == "cuda" and not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise SSPOError(f"device cuda was asked for, but {why} on this machine; training on the CPU instead would "
                        "take days (run on a GPU node, or pass --device cpu)")
    return requested == "cpu" or not torch.cuda.is_available()


# Settings a resumed run may change: how long it runs, how often it saves, memory and telemetry. Any other change
# would make the run something else than what its checkpoints and lineage say.
RESUMABLE_SETTINGS = {"output", "steps", "save_every", "async_checkpoint", "replay_cache_size",
                      "gradient_checkpointing", "threads", "use_encodings", "metrics_port", "pushgateway", "device",
                      "collective_timeout", "data_cache_gb"}
# May change with the number of processes, as long as the effective batch stays the same.
BATCH_SHAPE = {"batch_size", "gradient_accumulation_steps"}


def recorded_settings(cfg: TrainConfig) -> dict:
    """The train config as a checkpoint records it, with URLs independent of the current folder."""
    settings = json.loads(to_json(cfg))
    settings["model"], settings["data"] = storage.absolute(cfg.model), storage.absolute(cfg.data)
    settings["replay_from"] = [storage.absolute(url) for url in cfg.replay_from]
    settings["init_from"] = storage.absolute(cfg.init_from) if cfg.init_from else ""
    return settings


def changed_settings(recorded: dict, cfg: TrainConfig, recorded_effective_batch: int | None,
                     effective_batch: int) -> list[str]:
    """'name recorded → now' for every setting a resume may not change. Checkpoints that record their effective
    batch may resume with another split of it into batch size, accumulation and processes."""
    now = recorded_settings(cfg)
    # a setting newer than the checkpoint was, for that run, its default
    recorded = {**json.loads(to_json(TrainConfig())), **recorded}
    fixed = RESUMABLE_SETTINGS | (BATCH_SHAPE if recorded_effective_batch is not None else set())
    changed = [f"{name} {recorded.get(name)!r} → {value!r}" for name, value in now.items()
               if name not in fixed and recorded.get(name) != value]
    if recorded_effective_batch not in (None, effective_batch):
        changed.append(f"effective batch (batch_size × gradient_accumulation_steps × processes) "
                       f"{recorded_effective_batch} → {effective_batch}")
    return changed


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.objective = objectives.OBJECTIVES[cfg.objective]
        configure_threads(cfg.threads)
        self.accelerator = Accelerator(
            cpu=training_device(cfg.device),
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            # a lost peer stops the run after this long instead of hanging it
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.collective_timeout))],
        )
        expected_processes = int(os.environ.get("WORLD_SIZE", "1"))
        if self.accelerator.num_processes != expected_processes:
            raise SSPOError(
                f"{expected_processes} processes were launched but only {self.accelerator.num_processes} joined "
                "the process group; each would train alone and overwrite the others' checkpoints"
            )
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        self.effective_batch = cfg.batch_size * cfg.gradient_accumulation_steps * self.world_size
        self.where = "starting"  # what this process is doing, logged when a peer is lost
        self.data_seconds = 0.0  # reading the current step's data
        self.store = RunStore(cfg.output)

        # -- data
        self.data = ShardDataset(cfg.data, split=cfg.data_split or None, encodings=cfg.use_encodings, seed=cfg.seed,
                                 shuffle_shards=cfg.shuffle_shards, cache_bytes=int(cfg.data_cache_gb * 2**30))
        if self.objective.losing_image == "loser" and not self.data.paired:
            raise SSPOError(f"objective={cfg.objective} needs paired data: prepare {cfg.data} with --keep-pairs")

        # -- model, reference and optimizer
        self.parts = load_components(cfg.model).to(self.device)
        if self.data.encoded_with is not None:
            check_encodings(self.data.encoded_with, self.parts, cfg.data, cfg.model)
        unet = self.parts.unet
        freeze_for(self.parts, cfg.train_modules, cfg.model)
        torch.manual_seed(cfg.seed)
        if cfg.lora_rank:
            unet.requires_grad_(False)
            adapter = lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.train_modules)
            unet.add_adapter(adapter, adapter_name="default")
            self.reference = LoraReference(unet, adapter, self.load_pool_entry)
        else:
            reference_unet = copy.deepcopy(unet).to(self.device)
            self.reference = FullReference(reference_unet, cfg.replay_cache_size, self.load_pool_entry)
        unet.to(self.device).train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        kernel = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[cfg.adam_kernel]
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay,
                                      **kernel)
        self.lr_scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
        )

        self.step, self.pool = self.resume(unet, optimizer)
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.last_logged: dict = {}
        if self.is_main:
            run_config = {**json.loads(to_json(cfg)), "processes": self.world_size,
                          "effective_batch": self.effective_batch}
            self.store.write_config(json.dumps(run_config, indent=2))
            logged = self.store.start_log(self.step)
            self.last_logged = logged[-1] if logged else {}  # a run resumed at its last step still reports them
        self.uncond = self.parts.unconditional()
        self.sampler = make_sampler(cfg.sampler, self.parts.noise_scheduler.config)
        self.scaling = self.parts.vae.config.scaling_factor
        self.num_timesteps = self.parts.noise_scheduler.config.num_train_timesteps
        self.publisher = CheckpointPublisher(self.store, cfg.async_checkpoint,
                                             self.store.checkpoint_url(self.step) if self.step else None)

    def load_pool_entry(self, entry: str) -> dict:
        """Weights of a replay pool entry: θ₀'s UNet file, the local staging copy of this run's checkpoint still
        being published, or a checkpoint's weights file (checked against its manifest; nothing else of the
        checkpoint is fetched)."""
        if entry == BASE:
            return load_safetensors(base_unet_weights(self.parts.path))
        staged = self.publisher.local_copy(entry)
        if staged is not None:
            try:
                weights = load_safetensors(staged / CHECKPOINT_WEIGHTS)
                log.debug("replaying %s from its local copy, not yet published", entry)
                return weights
            except FileNotFoundError:
                pass  # published meanwhile, and a remote run's staging removed
        return load_safetensors(storage.fetch_file(self.store.entry_url(entry), CHECKPOINT_WEIGHTS))

    def start(self, unet) -> list[str]:
        """The replay pool of a fresh run: θ₀ (the base model, or `init_from` whose weights the UNet then takes)
        and the `replay_from` entries."""
        cfg = self.cfg
        replayed = [checkpoint_of_this_kind(cfg, url, "replay_from entry") for url in cfg.replay_from]
        if not cfg.init_from:
            return [BASE, *replayed]
        initial = checkpoint_of_this_kind(cfg, cfg.init_from, "init_from")
        load_weights(unet, load_safetensors(storage.fetch_file(initial, CHECKPOINT_WEIGHTS)), cfg.lora_rank)
        log.info("starting from the weights of %s", initial)
        return [initial, *replayed]

    def resume(self, unet, optimizer) -> tuple[int, list[str]]:
        """(step, replay pool) of the latest completely published checkpoint, its weights and optimizer state
        loaded; (0, a fresh pool) when the run has none."""
        latest = self.store.latest_checkpoint()
        if latest is None:
            return 0, self.start(unet)
        with checkpoint_files(latest) as directory:
            state, optimizer_state = read_training_state(directory)
            if "config" not in state:
                raise SSPOError(f"{latest} does not record the settings it was trained with (an older sspo wrote it); "
                                "train into a new output")
            changed = changed_settings(state["config"], self.cfg, state.get("effective_batch"), self.effective_batch)
            if changed:
                raise SSPOError(f"cannot resume {self.cfg.output} with other settings: {', '.join(changed)}; a "
                                f"resume may change only {', '.join(sorted(RESUMABLE_SETTINGS - {'output'}))} "
                                "(train into a new output instead)")
            weights = load_safetensors(directory / CHECKPOINT_WEIGHTS)
        load_weights(unet, weights, self.cfg.lora_rank)
        optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        log.info("resuming %s at step %d with a replay pool of %d", self.cfg.output, state["step"], len(state["pool"]))
        return state["step"], state["pool"]

    def slot(self, micro: int) -> int:
        """This process's slot of the step's effective batch at a micro-step."""
        return micro * self.world_size + self.rank

    def reference_index(self, step: int, slot: int) -> int:
        """The replay pool entry that is the reference of one slot of a step."""
        distribution = self.cfg.replay if self.objective.reference == "replay" else self.objective.reference
        return draw_index(distribution, len(self.pool), self.cfg.seed, step, slot)

    def micro_step(self, step: int, micro: int) -> tuple[torch.Tensor, dict, list[int]]:
        """(loss, statistics, sample ids) of this process's micro-step."""
        cfg, parts, device = self.cfg, self.parts, self.device
        slot = self.slot(micro)
        self.where = f"step {step + 1}, micro-step {micro}: reading data"
        reading = time.perf_counter()
        batch = self.data.batch_at(step * self.effective_batch + slot * cfg.batch_size, cfg.batch_size)
        self.data_seconds += time.perf_counter() - reading
        self.where = f"step {step + 1}, micro-step {micro}: forward and backward"
        generator = torch_generator(cfg.seed, 5, step, slot, 0)  # on one process: the keys used before slots

        def randn(shape) -> torch.Tensor:
            return torch.randn(shape, generator=generator).to(device)

        def timesteps(n: int) -> torch.Tensor:
            return torch.randint(self.num_timesteps, (n,), generator=generator).to(device)

        with torch.no_grad():
            cond = prompt_conditioning(parts, batch)
            cond_w = cond.with_time_ids(parts.time_ids(batch["geometry"]))
            winner = latent_sample(parts, batch, generator) * self.scaling
        if self.objective.reference is None:
            noise, t = randn(winner.shape), timesteps(len(winner))
            noisy = parts.noise_scheduler.add_noise(winner, noise, t)
            prediction = self.unet(noisy, t, **cond_w.unet_kwargs()).sample
            target = denoising_target(parts.noise_scheduler, winner, noise, t)
            loss, stats = self.objective.loss(objectives.PairErrors(per_sample_error(prediction, target)), cfg.beta,
                                              cfg.ssr)
            return loss, stats, batch["ids"]

        index = self.reference_index(step, slot)
        self.reference.activate(self.pool[index])
        last_micro = micro + 1 == cfg.gradient_accumulation_steps
        upcoming = (step + 1, self.rank) if last_micro else (step, self.slot(micro + 1))
        self.reference.prefetch(self.pool[self.reference_index(*upcoming)])

        with torch.no_grad(), self.reference.model() as reference_unet:
            if self.objective.losing_image == "loser":
                losing = latent_sample(parts, batch, generator, "loser") * self.scaling
                cond_l = cond.with_time_ids(parts.time_ids(batch["loser_geometry"]))
            else:
                cond_l = cond  # a self-sample is a generated image: uncropped, at the model's resolution
                losing = sample_latents(reference_unet, self.sampler, cond, self.uncond,
                                        randn(winner.shape), cfg.sample_steps, cfg.guidance)
            noise_w, t_w = randn(winner.shape), timesteps(len(winner))
            noise_l, t_l = (noise_w, t_w) if cfg.shared_noise else (randn(winner.shape), timesteps(len(winner)))
            noisy = torch.cat([parts.noise_scheduler.add_noise(winner, noise_w, t_w),
                               parts.noise_scheduler.add_noise(losing, noise_l, t_l)])
            target = torch.cat([denoising_target(parts.noise_scheduler, winner, noise_w, t_w),
                                denoising_target(parts.noise_scheduler, losing, noise_l, t_l)])
            t, context = torch.cat([t_w, t_l]), cond_w.cat(cond_l).unet_kwargs()
            err_w_ref, err_l_ref = per_sample_error(reference_unet(noisy, t, **context).sample, target).chunk(2)
        err_w, err_l = per_sample_error(self.unet(noisy, t, **context).sample, target).chunk(2)
        loss, stats = self.objective.loss(objectives.PairErrors(err_w, err_w_ref, err_l, err_l_ref), cfg.beta, cfg.ssr)
        return loss, {**stats, "ref_index": index}, batch["ids"]

    def save(self, step: int) -> None:
        """Publish a checkpoint of `step`; every `save_every` steps it also joins the replay pool. Weights that are
        not finite are never published. With `async_checkpoint` the step pays only for waiting on the previous
        checkpoint, if it is still being published, and for a snapshot of the state in CPU memory; the files are
        written and published in the background."""
        cfg = self.cfg
        pool_after = [*self.pool, self.store.pool_entry(step)] if step % cfg.save_every == 0 else self.pool
        model = self.accelerator.unwrap_model(self.unet)
        weights = get_peft_model_state_dict(model, adapter_name="default") if cfg.lora_rank else model.state_dict()
        broken = next((name for name, tensor in weights.items() if not torch.isfinite(tensor).all()), None)
        if broken is not None:
            self.stop_not_finite(f"after step {step} the weight {broken} holds NaN or inf values")
        if self.is_main:
            self.publisher.wait()  # one checkpoint in flight at most: one snapshot in memory
            settings = recorded_settings(cfg)
            info = {
                "kind": weights_kind(cfg),
                "lora_rank": cfg.lora_rank,
                "lora_alpha": cfg.lora_alpha or cfg.lora_rank,
                "step": step,
                "base_model": settings["model"],
                "data": settings["data"],
                "objective": cfg.objective,
                # what a LoRA adapter's weights attach to; absent means the whole UNet
                **({"train_modules": cfg.train_modules} if cfg.train_modules != "all" else {}),
            }
            state = {
                "step": step,
                "kind": info["kind"],
                "pool": pool_after,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "seed": cfg.seed,
                "effective_batch": self.effective_batch,
                "processes": self.world_size,
                "config": settings,
            }
            optimizer_state = self.optimizer.state_dict()
            if cfg.async_checkpoint:  # the next steps change these tensors in place while the worker writes them
                weights, optimizer_state, state = cpu_snapshot((weights, optimizer_state, state))
            self.publisher.submit(step, lambda directory: write_checkpoint(directory, weights, info, optimizer_state,
                                                                           state))
        else:
            self.publisher.follow(step)
        self.accelerator.wait_for_everyone()  # the other processes wait for the snapshot, not for the upload
        self.pool = pool_after

    def step_summary(self, step_stats: list[dict], ids: list[int], data_seconds: float) -> dict:
        """The step's statistics averaged over every slot of every process, the digest of the samples it trained on
        and its data-reading time (this process's)."""
        keys = sorted(step_stats[0])
        means = torch.tensor([[np.mean([s[key] for s in step_stats]) for key in keys]], dtype=torch.float64,
                             device=self.device)
        means = self.accelerator.gather(means).mean(dim=0).tolist()
        every_id = self.accelerator.gather(torch.tensor(ids, dtype=torch.int64, device=self.device))
        return {"step": self.step, **dict(zip(keys, means)), "lr": self.lr_scheduler.get_last_lr()[0],
                "samples": samples_digest(every_id), "data_seconds": data_seconds}

    def stop_not_finite(self, what: str) -> None:
        """Stop a run whose loss or weights became NaN/inf: push the step's metrics (the NaN-loss alert reads
        them), name the last good checkpoint and end in one line."""
        if self.is_main:
            telemetry.push_failure("train", self.cfg.pushgateway)
        self.publisher.close()  # the checkpoint in flight holds good weights: published before naming the last one
        latest = self.store.latest_checkpoint()
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was published"
        raise SSPOError(f"training stopped: {what}; {kept} (lower the learning rate or check the data)")

    def run(self) -> dict:
        cfg, accelerator = self.cfg, self.accelerator
        progress = Progress(cfg.steps, f"train {cfg.objective}", initial=self.step, enabled=self.is_main)
        last_stats = self.last_logged
        try:
            while self.step < cfg.steps:
                self.publisher.check()  # a checkpoint that failed in the background stops the run
                started = time.perf_counter()
                step_stats: list[dict] = []
                ids: list[int] = []
                for micro in range(cfg.gradient_accumulation_steps):
                    with accelerator.accumulate(self.unet), accelerator.autocast():
                        loss, stats, micro_ids = self.micro_step(self.step, micro)
                        loss = faults.loss_at_step(loss, self.step + 1)  # deterministic NaN tests; no-op otherwise
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    step_stats.append({"loss": loss.item(), **stats})
                    ids += micro_ids
                self.lr_scheduler.step()
                self.step += 1
                # Fault points (sspo.faults) let the fault tests kill a run in each window deterministically.
                faults.point("train-step-done")
                self.where = f"step {self.step}: gathering its statistics"
                last_stats = {**self.step_summary(step_stats, ids, self.data_seconds),
                              "seconds": time.perf_counter() - started}
                self.data_seconds = 0.0
                if self.is_main:
                    self.store.append_log(last_stats)
                    telemetry.record_step(last_stats, self.effective_batch)
                faults.point("train-step-logged")
                if not math.isfinite(last_stats["loss"]):  # the mean of every process's loss: all stop together
                    self.stop_not_finite(f"step {self.step} has a loss of {last_stats['loss']}")
                progress.update(1, **{k: v for k, v in last_stats.items() if k in ("loss", "ssr_rate", "seconds")})
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.where = f"step {self.step}: saving its checkpoint"
                    self.save(self.step)
            self.publisher.wait()
        except BaseException as err:
            if self.world_size > 1 and not isinstance(err, SSPOError):
                # the one line that says where each process was when a peer was lost or the run was stopped
                log.error("process %d of %d stopped at %s: %s", self.rank, self.world_size, self.where,
                          str(err).splitlines()[0] if str(err) else type(err).__name__)
            self.publisher.close()  # whatever stops the run, the checkpoint in flight is published first
            self.data.close()
            raise
        self.data.close()
        progress.close()
        self.reference.close()
        if not self.is_main:
            return {}
        publisher = self.publisher
        log.info("checkpoints took %.2f s to write and publish; training waited %.2f s for them",
                 publisher.publish_seconds, publisher.wait_seconds)
        summary = {"final_step": self.step, "checkpoint": self.store.checkpoint_url(self.step),
                   "pool_size": len(self.pool), "processes": self.world_size, "effective_batch": self.effective_batch,
                   **{f"final_{k}": v for k, v in last_stats.items() if k not in ("step", "samples")},
                   "checkpoint_publish_seconds": publisher.publish_seconds,
                   "checkpoint_wait_seconds": publisher.wait_seconds}
        self.store.finish(summary)
        return summary
