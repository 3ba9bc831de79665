"""One typed config per stage. Values come from the dataclass defaults, then params.yaml (the stage's section),
then command-line flags. Every value is validated with a message that names the knob."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sspo.errors import SSPOError

REPLAY_DISTRIBUTIONS = ("uniform", "initial", "latest")
MIXED_PRECISION = ("no", "fp16", "bf16")
DEVICES = ("auto", "cuda", "cpu")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
ADAM_KERNELS = ("default", "foreach", "fused")
EXPERIMENT_PHASES = ("all", "cells", "report")
MAX_RESOLUTION = 4096  # past SDXL's 1024 and video upscalers' 2048; a typo like 100000 would need ~30 GB per image


@dataclass
class WorldConfig:
    """Render the toy world: images of coloured shapes with prompts, split by attribute combination."""

    output: str = "data/world"
    samples_per_scene: int = field(default=40, metadata={
        "help": "images (clips) rendered per (colour, shape, position (direction))"})
    seed: int = 0
    video: bool = field(default=False, metadata={
        "help": "render the video world instead: 8-frame clips (GIF) of a shape moving left, right, up or down"})
    validation_split: bool = field(default=False, metadata={
        "help": "label 12 of the 48 training combinations 'validation' (for choosing settings; toy:validation)"})
    winner_errors: float = field(default=0.0, metadata={
        "help": "fraction of winners drawn with one attribute wrong (their losers with two): winners that are only "
                "preferred"})

    def validate(self):
        _require(self.samples_per_scene > 0, "samples_per_scene must be positive")
        _require(0 <= self.winner_errors <= 1, "winner_errors must be between 0 and 1")
        _require(not (self.video and (self.validation_split or self.winner_errors)),
                 "validation_split and winner_errors are options of the image world, not the video world")


@dataclass
class BootstrapConfig:
    """Pretrain the tiny SD-shaped base model on the toy world with systematically wrong captions."""

    world: str = "data/world"
    output: str = "models/base"
    seed: int = 0
    vae_steps: int = 600
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1200
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    uncond_prob: float = field(default=0.1, metadata={"help": "fraction of captions dropped for CFG"})
    caption_noise_color: float = field(default=0.6, metadata={"help": "fraction of colours shifted to the next"})
    caption_noise_shape: float = 0.0
    caption_noise_position: float = field(default=0.6, metadata={"help": "fraction of positions shifted"})
    caption_noise_direction: float = field(default=0.6, metadata={
        "help": "video family: fraction of motion directions shifted"})
    prediction_type: str = field(default="epsilon", metadata={
        "help": "what the UNet predicts: epsilon (SD 1.x, SD 2.x base) or v_prediction (SD 2.x 768)"})
    family: str = field(default="sd", metadata={
        "help": "model family: sd (SD-1.x/2.x-shaped), sdxl (two text encoders, pooled embedding, time ids) or "
                "video (AnimateDiff-shaped: the sd UNet with motion modules; needs a world made with --video)"})

    def validate(self):
        for name in ("vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size"):
            _require(getattr(self, name) > 0, f"{name} must be positive")
        for name in ("caption_noise_color", "caption_noise_shape", "caption_noise_position", "caption_noise_direction",
                     "uncond_prob"):
            _require(0.0 <= getattr(self, name) <= 1.0, f"{name} must be between 0 and 1")
        from sspo.models import PREDICTION_TYPES  # imports torch: only when a bootstrap config is checked

        _require(self.prediction_type in PREDICTION_TYPES,
                 f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}")
        from sspo.toy.model import FAMILIES

        _require(self.family in FAMILIES, f"family must be one of {', '.join(FAMILIES)}")
        for name in ("vae_lr", "unet_lr"):
            _require(getattr(self, name) > 0, f"{name} must be positive")
        _require(self.vae_kl_weight >= 0, "vae_kl_weight must be 0 or positive")


@dataclass
class PrepareConfig:
    """Turn a dataset (toy world, image folder, JSONL, Pick-a-Pic parquet) into validated training shards."""

    source: str = "data/world"
    output: str = "data/prepared"
    format: str = field(default="auto", metadata={"help": "auto, folder, jsonl or parquet"})
    resolution: int = 32
    keep_pairs: bool = field(default=False, metadata={"help": "keep the losing image too (for objective=dpo)"})
    on_error: str = field(default="skip", metadata={"help": "skip (count and report) or fail on a bad sample"})
    limit: int = field(default=0, metadata={"help": "stop after this many samples (0 = all)"})
    # 64 MP holds any camera or generated image in common use (61 MP full-frame sensors, 1024² Pick-a-Pic) and
    # bounds the decode of a small file with a lying header to about 256 MB (RGBA), below PIL's own 89 MP warning.
    max_pixels: int = field(default=64_000_000, metadata={
        "help": "refuse (as a bad sample) an image whose header claims more pixels, before decoding it"})
    encode_with: str = field(default="", metadata={
        "help": "model folder path or URL whose VAE and text encoders also encode every image (latent mean and log "
                "variance) and caption (prompt embeddings) into the shards, so training need not ('' = don't)"})
    encode_batch_size: int = field(default=16, metadata={"help": "images or captions per encoder call"})
    shard_size: int = field(default=0, metadata={
        "help": "samples per shard file (0 = as many as make about 256 MB of pixels: 170 pairs at 512², 42 at 1024²)"})
    workers: int = field(default=1, metadata={
        "help": "processes that decode and resize images; the output is the same for any number"})
    parts: int = field(default=1, metadata={
        "help": "split the source's files (images, records) into this many parts, each published on its own below "
                "OUTPUT/parts and merged into one dataset; without --part every part not yet published is made, "
                "then merged"})
    part: int = field(default=-1, metadata={"help": "make only this part (0 to parts - 1; -1 = all)"})
    merge: bool = field(default=False, metadata={
        "help": "only write the dataset's manifest from its published parts"})
    frames: int = field(default=0, metadata={
        "help": "0: the samples are images; N: they are clips (GIFs, or folders of frame images), of which the "
                "first N frames are kept (fewer: a bad sample)"})

    def validate(self):
        _require(self.format in ("auto", "folder", "jsonl", "parquet"), "format must be auto, folder, jsonl or parquet")
        _require(self.encode_batch_size > 0, "encode_batch_size must be positive")
        _require(self.shard_size >= 0, "shard_size must be 0 (by size) or positive")
        _require(self.workers > 0, "workers must be positive")
        _require(self.parts > 0, "parts must be positive")
        _require(-1 <= self.part < self.parts, "part must be -1 (all) or between 0 and parts - 1")
        _require(self.part == -1 or not self.merge, "give part (make one part) or merge, not both")
        _require(self.limit == 0 or self.parts == 1,
                 "limit caps the whole dataset, which parts made on their own cannot do: use parts 1")
        _require(self.on_error in ("skip", "fail"), "on_error must be skip or fail")
        _require(8 <= self.resolution <= MAX_RESOLUTION, f"resolution must be between 8 and {MAX_RESOLUTION}")
        _require(self.limit >= 0, "limit must be 0 (all) or positive")
        _require(self.max_pixels > 0, "max_pixels must be positive")
        _require(self.frames >= 0, "frames must be 0 (images) or positive (clips)")


@dataclass
class TrainConfig:
    """Fine-tune a diffusers SD-1.x/2.x model with SSPO (or sft, dpo, spin) and publish checkpoints as it goes."""

    model: str = field(default="models/base", metadata={"help": "base model: diffusers folder path or URL"})
    data: str = field(default="data/prepared", metadata={"help": "prepared shards path or URL"})
    output: str = field(default="runs/sspo", metadata={"help": "run folder path or URL; checkpoints go below it"})
    data_split: str = field(default="", metadata={
        "help": "train only on samples of this split, or of several joined by + (train+validation); '' = all"})
    shuffle_shards: int = field(default=64, metadata={
        "help": "shards whose samples are shuffled together; two such windows are open (and, for remote data, "
                "cached locally) at a time"})
    data_cache_gb: float = field(default=64.0, metadata={
        "help": "local cache for the shards of remote data, in GiB; must hold two windows of shards"})
    init_from: str = field(default="", metadata={
        "help": "checkpoint, run folder or registry version whose weights a fresh run starts from, and which is θ₀ "
                "of its replay pool ('' = the base model)"})
    objective: str = field(default="sspo", metadata={"help": "sspo, dpo, spin or sft"})
    ssr: str = field(default="sign", metadata={"help": "self-sampling regularization: sign, indicator, sft, off"})
    replay: str = field(default="uniform", metadata={"help": "reference draw: uniform, initial or latest"})
    beta: float = field(default=400.0, metadata={"help": "DPO temperature; 400 for the toy model, ~5000 for SD-1.5"})
    shared_noise: bool = field(default=True, metadata={"help": "one (t, noise) draw for both images of a pair"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "per-process micro-batch"})
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_schedule: str = "constant_with_warmup"
    lr_warmup_steps: int = 10
    adam_weight_decay: float = 0.0
    adam_kernel: str = field(default="default", metadata={
        "help": "AdamW implementation: default (torch's choice for the device), foreach (one kernel per step for "
                "all tensors) or fused (one fused kernel; CPU and CUDA)"})
    max_grad_norm: float = 1.0
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the full UNet"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha (0 = same as rank)"})
    train_modules: str = field(default="all", metadata={
        "help": "what trains: all (the whole UNet, or LoRA on all its attention) or motion (a video model's motion "
                "modules, or LoRA on their attention; the spatial UNet stays frozen)"})
    save_every: int = field(default=20, metadata={"help": "checkpoint (and replay pool entry) every N steps"})
    async_checkpoint: bool = field(default=True, metadata={
        "help": "write and publish checkpoints in the background; the step pays only for a copy of the state in "
                "CPU memory (false: the step waits for the upload)"})
    replay_cache_size: int = field(default=8, metadata={"help": "full fine-tune: pool entries kept in host RAM"})
    replay_from: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated extra replay pool entries after θ₀ for a fresh run: registry versions, "
                "checkpoints or run folders of earlier runs, dvc:// paths"})
    sampler: str = field(default="dpmsolver++", metadata={
        "help": "self-sample solver: dpmsolver++ (DPM-Solver++ 2M) or ddim (the paper's, with sample_steps 10)"})
    sample_steps: int = field(default=4, metadata={"help": "solver steps for self-samples"})
    guidance: float = field(default=4.0, metadata={"help": "classifier-free guidance for self-samples"})
    mixed_precision: str = "no"
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when there is a GPU), cuda (refuse to start without one) or cpu"})
    collective_timeout: int = field(default=1800, metadata={
        "help": "seconds a process waits for its peers in a collective operation before it stops the run"})
    gradient_checkpointing: bool = False
    use_encodings: bool = field(default=True, metadata={
        "help": "train on the latents and prompt embeddings stored with the data (sspo prepare --encode-with) when "
                "it has them; false encodes its pixels and captions each step"})
    threads: int = field(default=0, metadata={
        "help": "intra-op CPU threads; 0 = one per CPU of the cgroup's quota (torch's default without a quota)"})
    seed: int = 0
    metrics_port: int = field(default=0, metadata={"help": "serve Prometheus metrics on this port while training (0 = off)"})
    pushgateway: str = field(default="", metadata={"help": "Pushgateway URL for the final metrics (default $SSPO_PUSHGATEWAY)"})

    def validate(self):
        from sspo.objectives import OBJECTIVES, SSR_VARIANTS  # imports torch: only when a train config is checked

        _require(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}")
        _require(self.ssr in SSR_VARIANTS, f"ssr must be one of {', '.join(SSR_VARIANTS)}")
        _require(self.replay in REPLAY_DISTRIBUTIONS, f"replay must be one of {', '.join(REPLAY_DISTRIBUTIONS)}")
        from sspo.sampling import SAMPLERS

        _require(self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}")
        _require(self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}")
        _require(self.adam_kernel in ADAM_KERNELS, f"adam_kernel must be one of {', '.join(ADAM_KERNELS)}")
        _require(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        _require(self.beta > 0, "beta must be positive")
        # Comparisons with NaN are false: each float knob has a rule that a NaN breaks.
        for name in ("adam_weight_decay", "lora_alpha"):
            _require(getattr(self, name) >= 0, f"{name} must be 0 or positive")
        _require(self.max_grad_norm > 0, "max_grad_norm must be positive (inf turns clipping off)")
        _require(not math.isnan(self.guidance), "guidance must be a number, not NaN")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "save_every", "sample_steps"):
            _require(getattr(self, name) > 0, f"{name} must be positive")
        _require(self.replay_cache_size >= 2, "replay_cache_size must be at least 2 (current + prefetched)")
        _require(self.lora_rank >= 0, "lora_rank must be 0 (full fine-tune) or positive")
        from sspo.models import TRAIN_MODULES

        _require(self.train_modules in TRAIN_MODULES, f"train_modules must be one of {', '.join(TRAIN_MODULES)}")
        _require(self.threads >= 0, "threads must be 0 (from the CPU quota) or positive")
        _require(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}")
        _require(self.collective_timeout > 0, "collective_timeout must be positive")
        _require(self.shuffle_shards > 0, "shuffle_shards must be positive")
        _require(self.data_cache_gb > 0, "data_cache_gb must be positive")
        _require(0 <= self.metrics_port < 65536, "metrics_port must be 0 (off) or a TCP port")
        _require(self.learning_rate > 0, "learning_rate must be positive")


@dataclass
class EvaluateConfig:
    """Generate fixed prompts × fixed seeds with the base and the trained model, score them, write a report."""

    model: str = field(default="models/base", metadata={"help": "base model: diffusers folder path or URL"})
    checkpoint: str = field(default="", metadata={"help": "trained checkpoint path or URL ('' = base only)"})
    output: str = "eval"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3], metadata={"help": "comma-separated seeds"})
    sample_steps: int = 20
    guidance: float = 4.0
    batch_size: int = 64
    prompts: list[str] = field(default_factory=lambda: ["toy:train", "toy:heldout"], metadata={
        "help": "comma-separated prompt sets: toy:train, toy:heldout, or [NAME=]URL of a .txt/.jsonl file"})
    max_prompts: int = field(default=0, metadata={"help": "use the first N prompts of each set (0 = all)"})
    scorers: list[str] = field(default_factory=lambda: ["oracle"], metadata={
        "help": "comma-separated: oracle, pickscore, clipscore, hpsv2, aesthetic, imagereward"})
    scorer_paths: dict[str, str] = field(default_factory=dict, metadata={
        "help": "reward model folders as NAME=URL,... (a mapping in params.yaml)"})
    bootstrap_samples: int = field(default=1000, metadata={"help": "resamples for the win-rate interval"})
    bootstrap_seed: int = 0
    grid_prompts: int = field(default=48, metadata={"help": "prompts per grid image (0 = all)"})
    frames: int = field(default=8, metadata={"help": "frames per clip a video model generates"})
    pushgateway: str = field(default="", metadata={"help": "Pushgateway URL for the scores (default $SSPO_PUSHGATEWAY)"})
    rescore: str = field(default="", metadata={
        "help": "URL of a finished evaluation: score its saved images again with --scorers instead of sampling "
                "(model, checkpoint, prompts and sampler settings then come from that evaluation)"})

    def validate(self):
        _require(len(self.seeds) > 0 and min(self.seeds) >= 0, "seeds must list at least one seed, none negative")
        _require(self.sample_steps > 0, "sample_steps must be positive")
        _require(not math.isnan(self.guidance), "guidance must be a number, not NaN")
        _require(len(self.prompts) > 0, "prompts must name at least one prompt set")
        _require(len(self.scorers) > 0, "scorers must name at least one scorer")
        _require(self.bootstrap_samples > 0, "bootstrap_samples must be positive")
        _require(self.batch_size > 0, "batch_size must be positive")
        _require(self.max_prompts >= 0 and self.grid_prompts >= 0, "max_prompts and grid_prompts must be 0 or positive")
        _require(self.frames > 0, "frames must be positive")


@dataclass
class RegisterConfig:
    """Publish a trained checkpoint as an immutable version of a named model in the checkpoint registry."""

    registry: str = field(default="registry", metadata={"help": "registry root URL, e.g. s3://bucket/registry"})
    name: str = field(default="sspo-toy", metadata={"help": "model name in the registry"})
    checkpoint: str = field(default="runs/sspo", metadata={"help": "checkpoint URL, or a run folder (its latest)"})
    data: str = field(default="", metadata={"help": "training data URL for the lineage ('' = the checkpoint's)"})
    metrics: str = field(default="", metadata={"help": "metrics.json path or URL recorded with the version"})
    alias: str = field(default="candidate", metadata={"help": "alias to point at the new version ('' = none)"})
    version: str = field(default="", metadata={"help": "version id ('' = the next integer)"})
    output: str = field(default="", metadata={
        "help": "also write the version record (name, version, url) to this path or URL ('' = don't)"})

    def validate(self):
        _require(bool(self.registry), "registry must be a URL")
        _require(bool(self.checkpoint), "checkpoint must be a URL")


@dataclass
class ExportConfig:
    """Export a registry version, checkpoint or run as a complete diffusers folder with a model card."""

    checkpoint: str = field(default="", metadata={
        "help": "checkpoint URL, run folder (its latest), registry version folder, alias object or the record "
                "`sspo register --output` writes (not used when --registry names a version)"})
    registry: str = field(default="", metadata={
        "help": "registry root URL; with --name and --version or --alias it names the version to export"})
    name: str = field(default="", metadata={"help": "model name in the registry"})
    version: str = field(default="", metadata={"help": "version id"})
    alias: str = field(default="", metadata={"help": "alias, e.g. production"})
    model: str = field(default="", metadata={
        "help": "base model: diffusers folder path or URL ('' = the base model the checkpoint records)"})
    evaluation: str = field(default="", metadata={
        "help": "folder of an evaluation of this checkpoint: its scores and image grids go into the model card"})
    output: str = field(default="models/exported", metadata={"help": "new folder path or URL"})

    def validate(self):
        _require(bool(self.output), "output must be a URL")
        if self.registry:
            _require(bool(self.name), "name must name the model in the registry")
            _require(bool(self.version) != bool(self.alias), "give exactly one of version and alias")
        else:
            _require(bool(self.checkpoint), "give checkpoint, or registry with name and version or alias")
            _require(not (self.name or self.version or self.alias),
                     "name, version and alias name a version in a registry: give registry too")


@dataclass
class ExperimentConfig:
    """Train every arm (sft, dpo, spin, sspo and its ablations) from one base with one budget; compare them."""

    model: str = "models/base"
    data: str = field(default="data/prepared", metadata={"help": "prepared shards with pairs (for the dpo arm)"})
    data_split: str = "train"
    output: str = "experiments/toy"
    shared_params: str = field(
        default="params.yaml", metadata={"help": "YAML whose train and evaluate sections every arm shares"}
    )
    arms: list[str] = field(
        default_factory=lambda: ["sft", "dpo", "spin", "sspo", "sspo-replay-initial", "sspo-replay-latest",
                                 "sspo-ssr-off", "sspo-ssr-indicator"],
        metadata={"help": "comma-separated arms"},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds per arm"})
    steps: int = field(default=100, metadata={"help": "optimizer steps of every arm (same budget for all)"})
    batch_size: int = 16
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "sampling seeds per prompt"})
    eval_sample_steps: int = 20
    scorers: list[str] = field(default_factory=lambda: ["oracle"], metadata={
        "help": "comma-separated scorers of every evaluation (as in evaluate); arms are compared by the first"})
    prompts: list[str] = field(default_factory=lambda: ["toy:train", "toy:heldout"], metadata={
        "help": "comma-separated prompt sets of every evaluation (as in evaluate); the table details the last"})
    eval_at_steps: list[int] = field(default_factory=list, metadata={
        "help": "also evaluate each run's checkpoints at these steps (multiples of train.save_every): scores over "
                "steps"})
    sweep_beta: list[float] = field(default_factory=list, metadata={
        "help": "a settings sweep: every arm trains with each beta (arms without one, sft, skip it) × learning rate "
                "listed, and the report writes chosen.json, each arm's best settings by the first prompt set's score"})
    sweep_learning_rate: list[float] = field(default_factory=list, metadata={"help": "learning rates of the sweep"})
    tuned: str = field(default="", metadata={
        "help": "a sweep's chosen.json: each arm trains with the beta and learning rate chosen there"})
    phase: str = field(default="all", metadata={
        "help": "all: run missing (arm, seed) cells, then tabulate; cells: only run them; report: only tabulate "
                "finished cells (DVC runs cells and report as separate stages)"
    })

    def validate(self):
        _require(len(self.arms) > 0 and len(self.seeds) > 0, "arms and seeds must not be empty")
        _require(all(0 < step < self.steps for step in self.eval_at_steps),
                 "eval_at_steps must lie between 0 and steps (the last step is always evaluated)")
        _require(all(value > 0 for value in (*self.sweep_beta, *self.sweep_learning_rate)),
                 "sweep_beta and sweep_learning_rate must be positive")
        _require(not (self.tuned and (self.sweep_beta or self.sweep_learning_rate)),
                 "tuned settings and a sweep exclude each other")
        _require(self.phase in EXPERIMENT_PHASES, f"phase must be one of {', '.join(EXPERIMENT_PHASES)}")
        _require(self.steps > 0 and self.batch_size > 0, "steps and batch_size must be positive")
        _require(len(self.prompts) > 0, "prompts must name at least one prompt set")
        _require(len(self.scorers) > 0, "scorers must name at least one scorer")


STAGES = {
    "world": WorldConfig,
    "bootstrap": BootstrapConfig,
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "register": RegisterConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "experiment": ExperimentConfig,
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SSPOError(f"invalid config: {message}")


def field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(name: str, kind, value, what: str = "config"):
    """Turn a YAML, JSON or command-line value into `kind`, or fail naming `name`. Config fields and pipeline
    parameters both come through here, so a value means the same in params.yaml, a flag and a --param."""
    try:
        if kind is str and isinstance(value, bool):
            # YAML 1.1 (and tools that rewrite params.yaml, such as `dvc exp run -S`) read a bare `no` as false.
            return "yes" if value else "no"
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (list, dict):
            # untyped, as a KFP LIST or STRUCT parameter: a YAML/JSON value of that type or JSON text holding one
            loaded = json.loads(value) if isinstance(value, str) else value
            if not isinstance(loaded, kind):
                raise ValueError(value)
            return loaded
        if typing.get_origin(kind) is dict:
            if not isinstance(value, (dict, str)):
                raise ValueError(value)
            items = value if isinstance(value, dict) else dict(
                item.split("=", 1) for item in value.split(",") if item.strip())
            return {str(k).strip(): coerce(name, str, v, what).strip() for k, v in items.items()}
        if typing.get_origin(kind) is list:
            # comma-separated text, a YAML list, or one YAML value (`seeds: 3`); each item is checked as a value
            if isinstance(value, dict):
                raise ValueError(value)
            if isinstance(value, str):
                items = [v for v in value.split(",") if v.strip()]
            else:
                items = value if isinstance(value, list) else [value]
            return [coerce(name, typing.get_args(kind)[0], item, what) for item in items]
        # int() and str() take these too, as 1 or 0 and as their repr: never what was meant
        if value is None or isinstance(value, (bool, dict, list)):
            raise ValueError(value)
        if "\x00" in str(value):  # no path, URL or name holds one; file APIs fail on it with a ValueError
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise SSPOError(f"invalid {what}: {name}={value!r} is not a valid {getattr(kind, '__name__', kind)}") from None


class ParamsLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans (true/false only): YAML 1.1 also reads a bare yes/no/on/off as a boolean, which
    turned `ssr: off` or `mixed_precision: no` into one; bool fields still take those words (see coerce)."""


ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_yaml_mapping(params_file: str) -> dict:
    """A YAML (or JSON) file that must hold a mapping, e.g. params.yaml; one clear error otherwise."""
    path = Path(params_file)
    if not path.is_file():
        raise SSPOError(f"params file not found: {params_file}")
    try:
        loaded = yaml.load(path.read_text(), Loader=ParamsLoader) or {}
    except UnicodeDecodeError as err:
        raise SSPOError(f"{params_file} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
                        ) from None
    except yaml.YAMLError as err:
        raise SSPOError(f"{params_file} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, dict):
        raise SSPOError(f"{params_file} must hold a mapping of names to values")
    return loaded


def params_sections(params_file: str) -> dict:
    """The stage sections of a params file; `FILE#KEY` names those under KEY (`a.b` for nested keys), for a file
    holding several sets of params (e.g. one per condition of an experiment)."""
    path, _, key = params_file.partition("#")
    sections = read_yaml_mapping(path)
    for name in key.split(".") if key else []:
        sections = sections.get(name) if isinstance(sections, dict) else None
        if not isinstance(sections, dict):
            raise SSPOError(f"invalid config: {path} has no mapping {key!r}")
    return sections


def load(stage: str, params_file: str | None, overrides: dict) -> typing.Any:
    """The stage's config: defaults, then params.yaml[stage], then `overrides` (already-typed or string values)."""
    cls = STAGES[stage]
    types = field_types(cls)
    values: dict = {}
    if params_file:
        section = params_sections(params_file).get(stage) or {}
        if not isinstance(section, dict):
            raise SSPOError(f"invalid config: [{stage}] in {params_file} must be a mapping of names to values")
        unknown = sorted(set(section) - set(types))
        if unknown:
            raise SSPOError(f"invalid config: unknown key(s) in {params_file} [{stage}]: {', '.join(unknown)}")
        values.update(section)
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = cls(**{name: coerce(name, types[name], value) for name, value in values.items()})
    config.validate()
    return config


def to_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)
