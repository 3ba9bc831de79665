"""One KFP v2 component per stage. Each body only builds the stage's arguments and runs `sspo` (see shell.py).

They run in the project's image (IMAGE) with kfp already installed there, so the same components run in pods on a
cluster and under kfp.local.SubprocessRunner(use_venv=False) in tests. Imports stay inside the functions: KFP ships
each function's source on its own.
"""


from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from sspo.pipelines import IMAGE

component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def prepare(source: str, source_format: str, resolution: int, limit: int, prepared: Output[Dataset]):
    """Validated, resized training shards from any source URI."""
    from sspo.pipelines import shell

    shell.run_stage("prepare", source=source, format=source_format, resolution=resolution, limit=limit,
                    output=prepared.uri)
    shell.finish_output(prepared)


@component
def train(model_uri: str, data: Input[Dataset], objective: str, steps: int, batch_size: int, learning_rate: float,
          beta: float, replay: str, save_every: int, sampler: str, sample_steps: int, lora_rank: int,
          replay_from: str, pushgateway: str, run: Output[Model]):
    """Fine-tune the base model; checkpoints are published below the run as they are saved, so a retried pod
    resumes from the latest one."""
    from sspo.pipelines import shell

    shell.run_stage("train", model=model_uri, data=data.uri, output=run.uri, objective=objective, steps=steps,
                    batch_size=batch_size, learning_rate=learning_rate, beta=beta, replay=replay,
                    save_every=save_every, sampler=sampler, sample_steps=sample_steps, lora_rank=lora_rank,
                    replay_from=replay_from, pushgateway=pushgateway)
    shell.finish_output(run)


@component
def register(registry_url: str, model_name: str, run: Input[Model], data: Input[Dataset]) -> NamedTuple(
        "Registered", version=str, checkpoint=str):
    """Register the run's latest checkpoint as a new immutable version with the `candidate` alias."""
    from sspo.pipelines import shell

    return shell.register(registry_url, model_name, run.uri, data.uri)


@component
def evaluate(model_uri: str, checkpoint: str, registry_url: str, model_name: str, prompts: str, scorers: str,
             seeds: str, sample_steps: int, guidance: float, pushgateway: str, evaluation: Output[Artifact],
             production_evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown]):
    """Base vs candidate on fixed prompts × seeds, and base vs the current production version with the very same
    settings (when there is one), so that the promotion compares like with like. Production goes first: the
    candidate's scores are the ones left on the Pushgateway."""
    from sspo.evaluate.results import Evaluation
    from sspo.pipelines import shell

    settings = dict(model=model_uri, prompts=prompts, scorers=scorers, seeds=seeds, sample_steps=sample_steps,
                    guidance=guidance, pushgateway=pushgateway)
    production = shell.production_checkpoint(registry_url, model_name)
    if production:
        shell.run_stage("evaluate", checkpoint=production, output=production_evaluation.uri, **settings)
    shell.run_stage("evaluate", checkpoint=checkpoint, output=evaluation.uri, **settings)
    shell.finish_output(evaluation)
    shell.finish_output(production_evaluation)
    for name, value in Evaluation.read(evaluation.uri).scalars().items():
        metrics.log_metric(name, value)
    with open(report.path, "w") as f:
        f.write(shell.report_markdown(evaluation.uri))


@component
def compare(evaluation: Input[Artifact], production_evaluation: Input[Artifact], split: str, min_win_rate: float,
            min_improvement: float) -> bool:
    """Whether the candidate should replace the current `production` version."""
    from sspo.pipelines import shell

    return shell.should_promote(evaluation.uri, production_evaluation.uri, split, min_win_rate, min_improvement)


@component
def promote(registry_url: str, model_name: str, version: str):
    """Point the `production` alias at the candidate version."""
    from sspo.pipelines import shell

    shell.promote(registry_url, model_name, version)


@component
def export(registry_url: str, model_name: str, version: str, evaluation: Input[Artifact]) -> str:
    """The version as a diffusers folder with a model card (its evaluation's scores and grids) in the registry's
    exports folder; returns its URL."""
    from sspo.pipelines import shell

    return shell.export(registry_url, model_name, version, evaluation.uri)
