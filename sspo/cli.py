"""`sspo <stage>`: the single entry point. DVC stages and KFP components call these commands.

Every config field of a stage is a flag; values come from the defaults, then the stage's section of params.yaml
(`--params`, default ./params.yaml when it exists), then the flags.

Command groups that are not a single stage (e.g. `sspo registry ...`) live in their own modules, listed in
COMMAND_GROUPS: each has `add_commands(subparsers)`, whose parsers set a `handler(args) -> dict` default.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from pathlib import Path

from sspo import __version__, config
from sspo.errors import SSPOError

log = logging.getLogger("sspo")


def run_world(cfg: config.WorldConfig) -> dict:
    from sspo import storage
    from sspo.toy.world import generate

    with storage.staged_output(cfg.output) as (staging, extra):
        summary = generate(staging, cfg.samples_per_scene, cfg.seed)
        extra.update(summary)
    return summary


def run_bootstrap(cfg: config.BootstrapConfig) -> dict:
    from sspo import storage
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
    "experiment": run_experiment,
}


COMMAND_GROUPS: tuple[str, ...] = ("sspo.registry", "sspo.pipelines.cli")


def add_config_flags(sub: argparse.ArgumentParser, stage: str, cls) -> None:
    """--params plus one flag per field of the stage's config dataclass."""
    default_params = "params.yaml" if Path("params.yaml").exists() else None
    sub.add_argument("--params", default=default_params, help=f"YAML file whose '{stage}' section sets defaults")
    types = config.field_types(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", " ")
        if types[field.name] is bool:
            sub.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                             help=f"{help_text} (default: {default})")
        else:
            sub.add_argument(flag, dest=field.name, default=None, metavar=field.name.upper(),
                             help=f"{help_text} (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sspo", description="Self-Sampling Preference Optimization for diffusion models.")
    parser.add_argument("--version", action="version", version=f"sspo {__version__}")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for stage, cls in config.STAGES.items():
        doc = cls.__doc__.strip()
        add_config_flags(stages.add_parser(stage, help=doc, description=doc), stage, cls)
    for module in COMMAND_GROUPS:
        importlib.import_module(module).add_commands(stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "botocore", "s3fs", "aiobotocore", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if hasattr(args, "handler"):
            summary = args.handler(args)
        else:
            overrides = {k: v for k, v in vars(args).items() if k not in ("stage", "params")}
            stage_config = config.load(args.stage, args.params, overrides)
            summary = RUNNERS[args.stage](stage_config)
            from sspo import telemetry

            telemetry.push_stage(args.stage, getattr(stage_config, "pushgateway", ""))
    except SSPOError as err:
        print(f"sspo {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sspo {args.stage}: interrupted", file=sys.stderr)
        return 130
    if summary:
        log.info("%s done: %s", args.stage, json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
