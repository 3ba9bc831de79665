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


def sspo_command(argv: list, processes: int = 1) -> list[str]:
    """The command line of `sspo ARGV...`: one process, or `processes` processes on this machine under torchrun."""
    argv = [str(arg) for arg in argv]
    if processes <= 1:
        return [sys.executable, "-m", "sspo", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "sspo", *argv]


def run(argv: list, processes: int = 1) -> None:
    """Run `sspo ARGV...` as its own process(es), as a user would; a non-zero exit raises (the CLI has already said
    why on stderr)."""
    argv = [str(arg) for arg in argv]
    code = subprocess.run(sspo_command(argv, processes)).returncode
    if code != 0:
        raise RuntimeError(f"`sspo {' '.join(argv)}` failed with exit code {code}")


def stage_argv(stage: str, **options) -> list[str]:
    """`STAGE --field value ...`. params.yaml is ignored: in a pipeline, the pipeline parameters are the config."""
    argv: list = [stage, "--params", ""]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), value]
    return [str(arg) for arg in argv]


def run_stage(stage: str, **options) -> None:
    """`sspo STAGE --field value ...` (see stage_argv)."""
    run(stage_argv(stage, **options))


def training_sources(registry_url: str, model_name: str, init_from_alias: str,
                     replay_last_versions: int) -> tuple[str, list[str]]:
    """(init_from, versions to replay) of a retraining: the URL of the version `init_from_alias` points at ('' =
    the base model, also while the alias does not exist yet: the first scheduled run has no production version),
    and the URLs of the last `replay_last_versions` registered versions other than that one, which is already the
    first entry of the run's replay pool."""
    from sspo import registry

    init_from = ""
    if init_from_alias:
        version = registry.list_aliases(registry_url, model_name).get(init_from_alias)
        if version is None:
            print(f"{model_name} has no alias {init_from_alias!r} yet: starting from the base model")
        else:
            init_from = registry.version_url(registry_url, model_name, version)
            print(f"starting from {model_name} version {version} ({init_from_alias}): {init_from}")
    replayed = []
    if replay_last_versions > 0:
        urls = [registry.version_url(registry_url, model_name, version)
                for version in registry.list_versions(registry_url, model_name)]
        replayed = [url for url in urls if url != init_from][-replay_last_versions:]
        print(f"replaying {len(replayed)} earlier version(s) of {model_name}: {', '.join(replayed) or 'none yet'}")
    return init_from, replayed


def train_options(registry_url: str, model_name: str, init_from_alias: str, replay_last_versions: int,
                  replay_from: str, **options) -> dict:
    """The options of `sspo train` in the pipeline: `options` with the retraining sources resolved (init_from,
    and the replayed versions after the `replay_from` entries)."""
    init_from, replayed = training_sources(registry_url, model_name, init_from_alias, replay_last_versions)
    entries = [entry.strip() for entry in replay_from.split(",") if entry.strip()]
    return {**options, "init_from": init_from, "replay_from": ",".join(entries + replayed)}


def train_in_pod(gpus_per_node: int, **options) -> None:
    """`sspo train` in this pod: on the CPU without GPUs, else one process per GPU (torchrun from 2 GPUs on)."""
    run(stage_argv("train", **options, device="cuda" if gpus_per_node else "cpu"), processes=gpus_per_node)


def train_on_nodes(*, num_nodes: int, gpus_per_node: int, accelerator: str, cpu: str, memory: str, image: str,
                   runtime: str, run_id: str, **options) -> None:
    """`torchrun -m sspo train` on `num_nodes` × `gpus_per_node` GPUs: a Kubeflow Trainer TrainJob in this pod's
    namespace, waited for. It runs `image` with the steps' S3 secret and Pushgateway grouping, and writes to the
    same run URL as a one-node training would."""
    from sspo.pipelines import S3_SECRET, S3_SECRET_ENV, trainjob
    from sspo.telemetry import PIPELINE_ENV

    command = ["torchrun", "-m", "sspo", *stage_argv("train", **options, device="cuda")]
    env = {"PYTHONUNBUFFERED": "1"}
    if os.environ.get(PIPELINE_ENV):
        env[PIPELINE_ENV] = os.environ[PIPELINE_ENV]
    body = trainjob.build_trainjob(
        name=trainjob.trainjob_name(run_id), image=image, command=command, num_nodes=num_nodes,
        procs_per_node=gpus_per_node, accelerator=accelerator, cpu=cpu, memory=memory, run_id=run_id, env=env,
        secret_env={variable: (S3_SECRET, key) for variable, key in S3_SECRET_ENV.items()}, runtime=runtime)
    api, namespace = trainjob.kubernetes_api()
    trainjob.run_trainjob(api, namespace, body)


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
