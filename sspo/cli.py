"""`sspo <stage>`: the single entry point. DVC stages and KFP components call these commands.

Every config field of a stage is a flag; values come from the defaults, then the stage's section of params.yaml
(`--params`, default ./params.yaml when it exists), then the flags.

The stages themselves are library calls in `sspo.stages`. Command groups that are not a single stage set a
`handler(args) -> dict` default on their parsers: `sspo registry ...` is below (the registry library itself knows
nothing of the CLI), `sspo pipeline ...` lives in `sspo.pipelines.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from sspo import __version__, config, registry, storage
from sspo.errors import SSPOError
from sspo.pipelines import cli as pipeline_cli
from sspo.stages import RUNNERS, run_register

log = logging.getLogger("sspo")


def add_config_flags(sub: argparse.ArgumentParser, stage: str, cls) -> None:
    """--params plus one flag per field of the stage's config dataclass."""
    default_params = "params.yaml" if Path("params.yaml").exists() else None
    sub.add_argument("--params", default=default_params, help=f"YAML file whose '{stage}' section sets defaults (FILE#KEY: the sections under KEY)")
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


# -- `sspo registry ...`


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def registry_list(args) -> dict:
    names = [args.name] if args.name else registry._children(args.registry)
    _print_json({name: {"versions": registry.list_versions(args.registry, name),
                        "aliases": registry.list_aliases(args.registry, name)} for name in names})
    return {}


def registry_show(args) -> dict:
    version = registry.resolve_version(args.registry, args.name, args.version, args.alias)
    url = registry.version_url(args.registry, args.name, version)
    manifest = storage.read_json(storage.join(url, storage.MANIFEST))
    _print_json({**storage.read_json(storage.join(url, registry.LINEAGE)), "url": url,
                 "published_at": manifest.get("published_at")})
    return {}


def registry_promote(args) -> dict:
    record = registry.set_alias(args.registry, args.name, args.alias, args.version)
    _print_json(record)
    return {"alias": args.alias, "version": args.version, "previous": record["previous"]}


def registry_pull(args) -> dict:
    return registry.pull(args.registry, args.name, args.output, args.version, args.alias)


def registry_publish(args) -> dict:
    overrides = {k: v for k, v in vars(args).items() if k not in ("stage", "command", "params", "handler")}
    return run_register(config.load("register", args.params, overrides))


def add_registry_commands(stages) -> None:
    parser = stages.add_parser("registry", help="list, show, publish, promote and pull registered checkpoints",
                               description=registry.__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    def command(name: str, help_text: str, handler, model_required: bool = True):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--registry", required=True, help="registry root URL, e.g. s3://bucket/registry")
        sub.add_argument("--name", required=model_required, default="", help="model name")
        sub.set_defaults(handler=handler)
        return sub

    def version_or_alias(sub, required: bool = True):
        group = sub.add_mutually_exclusive_group(required=required)
        group.add_argument("--version", default="", help="version id")
        group.add_argument("--alias", default="", help="alias, e.g. production")

    command("list", "list models, their published versions and aliases (JSON)", registry_list, model_required=False)
    version_or_alias(command("show", "print a version's lineage (JSON)", registry_show))
    promote = command("promote", "point an alias at a published version (recorded in the alias history)",
                      registry_promote)
    promote.add_argument("--version", required=True, help="version id")
    promote.add_argument("--alias", required=True, help="alias, e.g. production")
    pull_parser = command("pull", "download a version (or alias) to a local folder, verifying every sha256",
                          registry_pull)
    version_or_alias(pull_parser)
    pull_parser.add_argument("--output", required=True, help="new local folder")
    publish = commands.add_parser("publish", help="same as `sspo register`",
                                  description=config.RegisterConfig.__doc__)
    add_config_flags(publish, "register", config.RegisterConfig)
    publish.set_defaults(handler=registry_publish)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sspo", description="Self-Sampling Preference Optimization for diffusion models.")
    parser.add_argument("--version", action="version", version=f"sspo {__version__}")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for stage, cls in config.STAGES.items():
        doc = cls.__doc__.strip()
        add_config_flags(stages.add_parser(stage, help=doc, description=doc), stage, cls)
    add_registry_commands(stages)
    pipeline_cli.add_commands(stages)
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
    except OSError as err:
        # the last resort for storage and system errors no stage anticipated (access denied, a full disk): the user
        # can act on the message, a traceback adds nothing
        reason = f"access denied: {err}" if isinstance(err, PermissionError) else str(err)
        print(f"sspo {args.stage}: error: {' '.join(reason.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sspo {args.stage}: interrupted", file=sys.stderr)
        return 130
    if summary:
        log.info("%s done: %s", args.stage, json.dumps(summary, default=str))
    return 0


def run() -> None:
    """The `sspo` command: main, then exit without the interpreter's teardown. By then the stage has published its
    outputs and joined its threads; tearing down native libraries' state at exit has, rarely, aborted a finished run
    (SIGABRT, "terminate called without an active exception"), which a pipeline would take for a failed step."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
