"""What pipeline components do inside their pods, kept in the library so each component body stays a few lines.

A component runs a stage through the `sspo` CLI, exactly as a user would, with its object-store URIs: on a cluster
the artifact URIs are s3:// URLs below the pipeline root, under kfp.local they are local paths.
"""

from __future__ import annotations

import json
import os
import tempfile

from sspo import storage
from sspo.errors import SSPOError

CANDIDATE, PRODUCTION = "candidate", "production"


def run(argv: list) -> None:
    """Run `sspo ARGV...` in this process; a non-zero exit raises (the CLI has already said why)."""
    from sspo.cli import main

    argv = [str(arg) for arg in argv]
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`sspo {' '.join(argv)}` failed with exit code {code}")


def run_stage(stage: str, **options) -> None:
    """`sspo STAGE --field value ...`. params.yaml is ignored: in a pipeline, the pipeline parameters are the config."""
    argv: list = [stage, "--params", ""]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), value]
    run(argv)


def finish_output(artifact) -> None:
    """The KFP launcher uploads each output's local path after the step; sspo already wrote the data to the
    artifact's URI, so a remote output only needs the (empty) local folder to exist."""
    if not storage.is_local(artifact.uri):
        os.makedirs(artifact.path, exist_ok=True)


def read_evaluation(evaluation_uri: str) -> dict | None:
    """An evaluation's metrics.json, or None where no evaluation was written."""
    url = storage.join(evaluation_uri, "metrics.json")
    return storage.read_json(url) if storage.exists(url) else None


def primary_score(metrics: dict, model: str, split: str) -> float:
    """The mean of the evaluation's first scorer (the oracle on the toy world) for `model` on prompt set `split`."""
    try:
        scorer = metrics["scorers"][0]
        return float(metrics["models"][model][split][scorer]["mean"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise SSPOError(f"evaluation metrics hold no primary score for {model} on prompt set {split!r}") from None


def win_rate(metrics: dict, split: str) -> float:
    """How often the trained model beats the base model on `split` by the first scorer (ties count half)."""
    try:
        return float(metrics["win_rate"][metrics["scorers"][0]][split]["rate"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise SSPOError(f"evaluation metrics hold no win rate on prompt set {split!r}") from None


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """Every number under `models` and `win_rate`, named by its path (e.g. models.trained.heldout.oracle.mean)."""
    scalars: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[prefix] = float(value)

    for section in ("models", "win_rate"):
        walk(section, metrics.get(section, {}))
    return scalars


def report_markdown(evaluation_uri: str) -> str:
    """The evaluation's report: report.md where the evaluation wrote one, else its score table."""
    for name in ("report.md", "table.md"):
        url = storage.join(evaluation_uri, name)
        if storage.exists(url):
            return storage.read_text(url)
    raise SSPOError(f"{evaluation_uri} holds neither report.md nor table.md")


def register(registry_url: str, model_name: str, run_uri: str, data_uri: str) -> tuple[str, str]:
    """`sspo register` the run's latest checkpoint with the `candidate` alias; returns (version, version URL)."""
    with tempfile.TemporaryDirectory(prefix="sspo-register-") as folder:
        record_file = os.path.join(folder, "record.json")
        run_stage("register", registry=registry_url, name=model_name, checkpoint=run_uri, data=data_uri,
                  metrics=storage.join(run_uri, "metrics.json"), alias=CANDIDATE, output=record_file)
        with open(record_file) as f:
            record = json.load(f)
    return record["version"], record["url"]


def production_checkpoint(registry_url: str, model_name: str) -> str:
    """The URL of the version the `production` alias points at ('' while there is none)."""
    from sspo import registry

    version = registry.list_aliases(registry_url, model_name).get(PRODUCTION)
    return registry.version_url(registry_url, model_name, version) if version else ""


def promotion_decision(candidate: dict, production: dict | None, split: str, min_win_rate: float,
                       min_improvement: float) -> tuple[bool, str]:
    """Promote when the candidate beats the base model often enough and beats the production version's score
    (measured in the same run, so prompts, seeds, sampler and scorers are identical)."""
    rate, score = win_rate(candidate, split), primary_score(candidate, "trained", split)
    if rate < min_win_rate:
        return False, f"win rate vs base {rate:.3f} is below the minimum {min_win_rate:.3f}"
    if production is None:
        return True, f"no production version yet; win rate {rate:.3f}, score {score:.3f}"
    current = primary_score(production, "trained", split)
    if score < current + min_improvement:
        return False, f"score {score:.3f} does not beat production's {current:.3f} by {min_improvement:.3f}"
    return True, f"score {score:.3f} beats production's {current:.3f} by at least {min_improvement:.3f}"


def should_promote(evaluation_uri: str, production_evaluation_uri: str, split: str, min_win_rate: float,
                   min_improvement: float) -> bool:
    candidate = read_evaluation(evaluation_uri)
    if candidate is None:
        raise SSPOError(f"no evaluation metrics at {evaluation_uri}")
    promote, reason = promotion_decision(candidate, read_evaluation(production_evaluation_uri), split,
                                         min_win_rate, min_improvement)
    print(f"{'promote' if promote else 'keep production'}: {reason}")
    return promote


def promote(registry_url: str, model_name: str, version: str) -> None:
    run(["registry", "promote", "--registry", registry_url, "--name", model_name, "--version", version,
         "--alias", PRODUCTION])
