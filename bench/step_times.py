"""Step-time benchmark on the toy model at batch 8, printed as ratios to the Diffusion-DPO step.

Measures, in one process so the ratios share the machine's state:
- the median optimizer-step time of sft, dpo and sspo (full fine-tune) from the trainer's own step log, sspo with
  the default self-sampler (DPM-Solver++, 4 steps) and with the paper's (DDIM, 10 steps), and SSPO's throughput
  (winner images per second) as a fraction of DPO's;
- self-sampling alone (CFG 4, one batch of latents) with either sampler;
- the replay reference switch for a pool of 50 entries, LoRA (adapter copy) and full (LRU + prefetch, and cold);
- the dpo step next to one competing busy process, with torch's default threads and with one thread fewer;
- a dpo step that saves a checkpoint (step time plus its `save` call; local output, a save every step), with the
  checkpoint published inline and in the background, and per checkpoint the time to write and publish it and the
  time the step waited for it;
- the dpo and sspo steps on pairs prepared with `--encode-with` (latents and prompt embeddings stored), with the
  stored encodings and with use_encodings off (VAE and text encoders run every step), and the dpo step with the
  stored encodings and the fused AdamW together;
- the dpo step with each AdamW implementation (`adam_kernel`: default, foreach, fused);
- the share of a dpo step spent reading its data (the trainer's `data_seconds`), with the data on local disk and
  streamed from an S3 server on loopback (moto, as in the tests) through the bounded shard cache.
The figures are also written to bench/results/step_times.json. Prepare throughput is bench/prepare_throughput.py.

Usage: python bench/step_times.py [--steps 12] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from s3server import BUCKET, S3Server, apply_env, restore_env  # noqa: E402
from sspo import config, storage
from sspo.config import ADAM_KERNELS
from sspo.models import load_components, lora_config
from sspo.sampling import make_sampler, sample_latents
from sspo.stages import run_bootstrap, run_prepare, run_train, run_world
from sspo.train.replay import FullReference, LoraReference, load_safetensors
from sspo.train.trainer import Trainer

BATCH = 8
POOL = 50
RESULTS = Path(__file__).resolve().parent / "results"
PAPER_SAMPLER = {"sampler": "ddim", "sample_steps": 10}
COMPETITOR = "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a @ a"


def median_step_seconds(run_dir: Path, warmup: int = 2) -> float:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(row["seconds"] for row in rows[warmup:])


def median_data_share(run_dir: Path, warmup: int = 2) -> float:
    """The median over steps of the share of the step spent reading its data."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(row["data_seconds"] / row["seconds"] for row in rows[warmup:])


def streamed_data_share(common: dict, work: Path) -> float:
    """The data-reading share of a dpo step whose data is streamed from S3 (a moto server on loopback) through the
    bounded local shard cache, starting with an empty cache."""
    server = S3Server()
    server.start()
    previous = apply_env({**server.env(), "SSPO_CACHE": str(work / "streaming-cache")})
    try:
        server.ensure_bucket()
        url = f"s3://{BUCKET}/pairs"
        manifest = storage.read_json(storage.join(common["data"], storage.MANIFEST))
        storage.publish_dir(Path(common["data"]), url, {key: value for key, value in manifest.items()
                                                        if key not in ("files", "publish_id")})
        run = work / "run-dpo-streamed"
        run_train(config.load("train", None, {**common, "data": url, "objective": "dpo", "output": str(run)}))
        return median_data_share(run)
    finally:
        restore_env(previous)
        server.stop()


def time_calls(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def saving_step_seconds(common: dict, work: Path, background: bool, warmup: int = 2) -> dict:
    """A dpo run that saves every step, its checkpoints published in the background or inline: the median step
    that saves (its logged time, which leaves the save out, plus its `save` call), and per checkpoint the time to
    write and publish it and the time training waited for it."""
    output = work / f"run-dpo-save-{'background' if background else 'inline'}"
    trainer = Trainer(config.load("train", None, {**common, "objective": "dpo", "output": str(output),
                                                  "save_every": 1, "async_checkpoint": background}))
    save, saves = trainer.save, []

    def timed_save(step: int) -> None:
        started = time.perf_counter()
        save(step)
        saves.append(time.perf_counter() - started)

    trainer.save = timed_save
    summary = trainer.run()
    rows = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return {"step": statistics.median(row["seconds"] + seconds for row, seconds in list(zip(rows, saves))[warmup:]),
            "publish": summary["checkpoint_publish_seconds"] / len(saves),
            "wait": summary["checkpoint_wait_seconds"] / len(saves)}


def alternating_medians(common: dict, work: Path, variants: dict, rounds: int = 3) -> dict:
    """Median step of each variant (train settings over `common`). The runs alternate for `rounds` rounds (median of
    their medians), so a change in the machine's load mid-way does not fall on one variant only."""
    medians: dict = {}
    for round_ in range(rounds):
        for index, (key, settings) in enumerate(variants.items()):
            run = work / f"run-variant-{index}-{round_}"
            run_train(config.load("train", None, {**common, **settings, "output": str(run)}))
            medians.setdefault(key, []).append(median_step_seconds(run))
    return {key: statistics.median(values) for key, values in medians.items()}


# The step before the encodings were stored, with them, and with them and the fused AdamW as well (both levers).
ENCODING_VARIANTS = {
    "stored encodings": {"use_encodings": True},
    "encoding each step": {"use_encodings": False},
    "stored encodings + fused AdamW": {"use_encodings": True, "adam_kernel": "fused"},
}


def encoding_step_seconds(common: dict, work: Path, world: str, base: str) -> dict:
    """dpo and sspo steps on pairs prepared with their latent distributions and prompt embeddings (`--encode-with`),
    using them and, with use_encodings off, VAE- and text-encoding every step as before."""
    data = str(work / "pairs-encoded")
    run_prepare(config.load("prepare", None, {"source": world, "output": data, "keep_pairs": True,
                                              "encode_with": base}))
    variants = {(objective, name): {"data": data, "objective": objective, **settings}
                for objective in ("dpo", "sspo") for name, settings in ENCODING_VARIANTS.items()
                if objective == "dpo" or "AdamW" not in name}
    return alternating_medians(common, work / "encodings", variants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sspo-bench-"))

    world, base = str(work / "world"), str(work / "base")
    run_world(config.load("world", None, {"output": world, "samples_per_scene": 2}))
    run_bootstrap(config.load("bootstrap", None, {"world": world, "output": base, "vae_steps": 5, "unet_steps": 5}))
    run_prepare(config.load("prepare", None, {"source": world, "output": str(work / "pairs"), "keep_pairs": True}))

    common = {"model": base, "data": str(work / "pairs"), "steps": args.steps, "batch_size": BATCH,
              "save_every": args.steps}
    step = {}
    for objective in ("sft", "dpo", "sspo"):
        run = work / f"run-{objective}"
        run_train(config.load("train", None, {**common, "objective": objective, "output": str(run)}))
        step[objective] = median_step_seconds(run)
    run = work / "run-sspo-paper-sampler"
    run_train(config.load("train", None, {**common, **PAPER_SAMPLER, "objective": "sspo", "output": str(run)}))
    step["sspo, paper sampler"] = median_step_seconds(run)
    data_share = {"local": median_data_share(work / "run-dpo"), "S3": streamed_data_share(common, work)}
    saving = {background: saving_step_seconds(common, work, background) for background in (False, True)}
    encoding = encoding_step_seconds(common, work, world, base)
    adam = alternating_medians(common, work / "adam", {kernel: {"objective": "dpo", "adam_kernel": kernel}
                                                      for kernel in ADAM_KERNELS})

    # A neighbour busy on one core, as on a shared node: the trainer with torch's default pool (one thread per core)
    # against one thread per CPU left, which is what `threads` (or the pod's CPU quota) gives.
    default_threads = torch.get_num_threads()
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
    try:
        for threads in (default_threads, max(1, default_threads - 1)):
            run = work / f"run-dpo-competed-{threads}"
            run_train(config.load("train", None, {**common, "objective": "dpo", "output": str(run),
                                                  "threads": threads}))
            step[f"dpo, 1 competing process, {threads} threads"] = median_step_seconds(run)
    finally:
        competitor.kill()
        torch.set_num_threads(default_threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = load_components(base).to(device)
    unet = parts.unet.eval().to(device)
    cond, uncond = parts.encode(["a red circle on the left"] * BATCH), parts.unconditional()
    noise = torch.randn(BATCH, 4, parts.latent_size, parts.latent_size, device=device)
    default = config.load("train", None, {})
    sampling = {}
    for name, steps in ((default.sampler, default.sample_steps), tuple(PAPER_SAMPLER.values())):
        scheduler = make_sampler(name, parts.noise_scheduler.config)
        sampling[name, steps] = time_calls(lambda: sample_latents(unet, scheduler, cond, uncond, noise, steps, 4.0), 5)

    # A pool of 50 entries written as checkpoint files, then random switches as training would draw them.
    pool_dir = work / "pool"
    pool_dir.mkdir(exist_ok=True)
    full_entries = []
    for index in range(POOL):
        path = pool_dir / f"full-{index}.safetensors"
        save_file({k: v + 1e-3 * index for k, v in unet.state_dict().items()}, str(path))
        full_entries.append(str(path))
    draws = np.random.default_rng(0).integers(POOL, size=40)

    def switch_times(reference, entries, prefetch: bool) -> float:
        times = []
        for current, upcoming in zip(draws[:-1], draws[1:]):
            started = time.perf_counter()
            reference.activate(entries[current])
            times.append(time.perf_counter() - started)
            if prefetch:
                reference.prefetch(entries[upcoming])
                time.sleep(step["dpo"])  # the training step the prefetch overlaps with
        return statistics.median(times)

    full_prefetched = FullReference(parts.unet, 8, load_safetensors)
    full_switch = switch_times(full_prefetched, full_entries, prefetch=True)
    full_prefetched.close()
    full_cold = FullReference(parts.unet, 2, load_safetensors)
    full_switch_cold = switch_times(full_cold, full_entries, prefetch=False)
    full_cold.close()

    lora_unet = load_components(base).unet.to(device)
    adapter = lora_config(4, 4)
    lora_unet.add_adapter(adapter, adapter_name="default")
    lora_entries = []
    for index in range(POOL):
        path = pool_dir / f"lora-{index}.safetensors"
        weights = get_peft_model_state_dict(lora_unet, adapter_name="default")
        save_file({k: v + 1e-3 * index for k, v in weights.items()}, str(path))
        lora_entries.append(str(path))
    lora_switch = switch_times(LoraReference(lora_unet, adapter, load_safetensors), lora_entries, prefetch=False)

    rows = [
        ("sft step", step["sft"]),
        ("dpo step", step["dpo"]),
        ("sspo step", step["sspo"]),
        ("sspo step, paper sampler (DDIM-10)", step["sspo, paper sampler"]),
        *((name, seconds) for name, seconds in step.items() if "competing" in name),
        *((f"self-sampling alone ({name}, {steps} steps, CFG 4)", seconds)
          for (name, steps), seconds in sampling.items()),
        (f"replay switch, LoRA r=4, pool {POOL}", lora_switch),
        (f"replay switch, full, pool {POOL}, LRU 8 + prefetch", full_switch),
        (f"replay switch, full, pool {POOL}, cold load", full_switch_cold),
        ("dpo step + save, publish inline", saving[False]["step"]),
        ("dpo step + save, publish in the background", saving[True]["step"]),
        ("checkpoint write + publish, inline", saving[False]["publish"]),
        ("checkpoint write + publish, in the background", saving[True]["publish"]),
        ("step's wait for the background publish, per save", saving[True]["wait"]),
        *((f"{objective} step, {name}", seconds) for (objective, name), seconds in encoding.items()),
        *((f"dpo step, AdamW {kernel}", seconds) for kernel, seconds in adam.items()),
    ]
    print(f"\ntoy model, batch {BATCH}, {device}, {torch.get_num_threads()} threads; medians; ratio = time / dpo step")
    print(f"{'measure':<52}{'seconds':>10}{'ratio':>8}")
    for name, seconds in rows:
        print(f"{name:<52}{seconds:>10.4f}{seconds / step['dpo']:>8.3f}")
    # Every step trains on BATCH winners, so throughputs relate as the inverse step times.
    throughput = {name: step["dpo"] / step[name] for name in ("sspo", "sspo, paper sampler")}
    print(f"sspo throughput / dpo throughput: {throughput['sspo']:.3f} "
          f"(paper sampler: {throughput['sspo, paper sampler']:.3f})")
    background_over_inline = saving[True]["step"] / saving[False]["step"]
    print(f"dpo step + save, background / inline publish: {background_over_inline:.3f}")
    stored_ratio = encoding["dpo", "stored encodings"] / encoding["dpo", "encoding each step"]
    both_ratio = encoding["dpo", "stored encodings + fused AdamW"] / encoding["dpo", "encoding each step"]
    print(f"dpo step, stored encodings / encoding each step: {stored_ratio:.3f}")
    print(f"dpo step, stored encodings + fused AdamW / encoding each step, default AdamW: {both_ratio:.3f}")
    print(f"dpo step, fused / default AdamW: {adam['fused'] / adam['default']:.3f}")
    for where, share in data_share.items():
        print(f"dpo step, share spent reading data ({where}): {share:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_times.json").write_text(json.dumps({
        "device": device, "threads": torch.get_num_threads(), "batch": BATCH,
        "seconds": dict(rows), "ratio_to_dpo": {name: seconds / step["dpo"] for name, seconds in rows},
        "sspo_throughput_over_dpo": throughput["sspo"],
        "sspo_paper_sampler_throughput_over_dpo": throughput["sspo, paper sampler"],
        "save_step_background_over_inline": background_over_inline,
        "dpo_step_stored_encodings_over_encoding_each_step": stored_ratio,
        "dpo_step_stored_encodings_fused_adam_over_encoding_each_step_default_adam": both_ratio,
        "dpo_step_fused_adam_over_default": adam["fused"] / adam["default"],
        "dpo_step_data_share": data_share},
        indent=2))
    print(f"written to {RESULTS / 'step_times.json'}")


if __name__ == "__main__":
    main()
