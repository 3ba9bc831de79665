"""What pipeline components do inside their pods, kept in the library so each component body stays a few lines.

A component runs a stage through the `sspo` CLI, exactly as a user would, with its object-store URIs: on a cluster
the artifact URIs are s3:// URLs below the pipeline root, under kfp.local they are local paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from sspo import storage
from sspo.errors import SSPOError
from sspo.evaluate.results import METRICS_FILE, Evaluation

CANDIDATE, PRODUCTION = "candidate", "production"


def run(argv: list) -> None:
    """Run `sspo ARGV...` as its own process, as a user would; a non-zero exit raises (the CLI has already said
    why on stderr)."""
    argv = [str(arg) for arg in argv]
    code = subprocess.run([sys.executable, "-m", "sspo", *argv]).returncode
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


def read_evaluation(evaluation_uri: str) -> Evaluation | None:
    """An evaluation's results, or None where no evaluation was written (no production version yet)."""
    return Evaluation.read(evaluation_uri) if storage.exists(storage.join(evaluation_uri, METRICS_FILE)) else None


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


def promotion_decision(candidate: Evaluation, production: Evaluation | None, split: str, min_win_rate: float,
                       min_improvement: float) -> tuple[bool, str]:
    """Promote when the candidate beats the base model often enough and beats the production version's score by
    the primary scorer (measured in the same run, so prompts, seeds, sampler and scorers are identical)."""
    rate, score = candidate.win_rate(split).rate, candidate.score("trained", split)
    current = production.score("trained", split) if production is not None else None
    if rate is None or score is None or (production is not None and current is None):
        raise SSPOError(f"scorer {candidate.primary_scorer} scored no image of prompt set {split!r}: "
                        "it cannot decide a promotion")
    if rate < min_win_rate:
        return False, f"win rate vs base {rate:.3f} is below the minimum {min_win_rate:.3f}"
    if production is None:
        return True, f"no production version yet; win rate {rate:.3f}, score {score:.3f}"
    if score < current + min_improvement:
        return False, f"score {score:.3f} does not beat production's {current:.3f} by {min_improvement:.3f}"
    return True, f"score {score:.3f} beats production's {current:.3f} by at least {min_improvement:.3f}"


def should_promote(evaluation_uri: str, production_evaluation_uri: str, split: str, min_win_rate: float,
                   min_improvement: float) -> bool:
    production = read_evaluation(production_evaluation_uri)
    promote, reason = promotion_decision(Evaluation.read(evaluation_uri), production, split, min_win_rate,
                                         min_improvement)
    print(f"{'promote' if promote else 'keep production'}: {reason}")
    return promote


def promote(registry_url: str, model_name: str, version: str) -> None:
    run(["registry", "promote", "--registry", registry_url, "--name", model_name, "--version", version,
         "--alias", PRODUCTION])


def export(registry_url: str, model_name: str, version: str, evaluation_uri: str) -> str:
    """`sspo export` of a registry version, with its evaluation in the model card, to the registry's exports
    folder (<registry>/<name>/exports/<version>); returns that URL."""
    from sspo import registry

    url = registry.export_url(registry_url, model_name, version)
    run_stage("export", registry=registry_url, name=model_name, version=version, evaluation=evaluation_uri,
              output=url)
    return url
