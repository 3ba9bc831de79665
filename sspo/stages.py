"""The stages as library calls: each takes its typed config, does the work and returns a small summary. The CLI
(`sspo <stage>`) parses flags into these configs and calls them; so do tests and `sspo pipeline run-local`."""

from __future__ import annotations

import dataclasses
import json

from sspo import config, storage


def run_world(cfg: config.WorldConfig) -> dict:
    from sspo.toy import video_world, world

    with storage.staged_output(cfg.output) as (staging, extra):
        if cfg.video:
            summary = video_world.generate(staging, cfg.samples_per_scene, cfg.seed)
        else:
            summary = world.generate(staging, cfg.samples_per_scene, cfg.seed, cfg.validation_split,
                                     cfg.winner_errors)
        extra.update(summary)
    return summary


def run_bootstrap(cfg: config.BootstrapConfig) -> dict:
    from sspo.toy.bootstrap import bootstrap

    with storage.staged_output(cfg.output) as (staging, extra):
        summary = bootstrap(cfg, staging)
        (staging / "bootstrap.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), **summary}, indent=2))
        extra.update(summary)
    return summary


def run_prepare(cfg: config.PrepareConfig) -> dict:
    from sspo.prepare import prepare

    return prepare(
        cfg.source,
        cfg.output,
        source_format=cfg.format,
        resolution=cfg.resolution,
        keep_pairs=cfg.keep_pairs,
        on_error=cfg.on_error,
        limit=cfg.limit or None,
        max_pixels=cfg.max_pixels,
        encode_with=cfg.encode_with,
        encode_batch_size=cfg.encode_batch_size,
        shard_size=cfg.shard_size,
        workers=cfg.workers,
        parts=cfg.parts,
        part=None if cfg.part == -1 else cfg.part,
        merge=cfg.merge,
        frames=cfg.frames,
    )


def run_train(cfg: config.TrainConfig) -> dict:
    from sspo import telemetry
    from sspo.train.trainer import train

    with telemetry.serve_training(cfg.metrics_port):
        return train(cfg)


def run_register(cfg: config.RegisterConfig) -> dict:
    from sspo.registry import register

    record = register(cfg)
    print(json.dumps(record))
    return record


def run_evaluate(cfg: config.EvaluateConfig) -> dict:
    from sspo.evaluate.evaluate import evaluate, table

    metrics = evaluate(cfg)
    print(table(metrics))
    return {"output": cfg.output}


def run_export(cfg: config.ExportConfig) -> dict:
    from sspo.export import export

    result = export(cfg)
    print(json.dumps(result))
    return result


def run_experiment(cfg: config.ExperimentConfig) -> dict:
    from sspo.experiment import run_experiment as experiment

    summary = experiment(cfg)
    if "table" in summary:
        print(summary.pop("table"))
    return summary


RUNNERS = {
    "world": run_world,
    "bootstrap": run_bootstrap,
    "prepare": run_prepare,
    "train": run_train,
    "register": run_register,
    "evaluate": run_evaluate,
    "export": run_export,
    "experiment": run_experiment,
}
