"""One KFP v2 component per stage. Each body only builds the stage's arguments and runs `sspo` (see shell.py).

They run in the project's images with kfp already installed there (the CUDA image where a step uses GPUs, the CPU
image elsewhere), so the same components run in pods on a cluster and under kfp.local.SubprocessRunner(use_venv=False)
in tests. Imports stay inside the functions: KFP ships
each function's source on its own.
"""


from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from sspo.pipelines import CUDA_IMAGE, IMAGE

component = dsl.component(base_image=IMAGE, install_kfp_package=False)
gpu_component = dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)


@component
def list_parts(source: str, source_format: str, parts: int, frames: int, prepared: Output[Dataset]) -> list:
    """The parts of the source to prepare side by side: `parts` groups of its files (fewer when it has fewer).
    `prepared` is the dataset's folder: the parts are published below it, then merged into it."""
    from sspo.pipelines import shell
    from sspo.prepare import part_numbers

    numbers = part_numbers(source, source_format, parts, frames)
    shell.finish_output(prepared)
    return numbers


@component
def prepare(source: str, source_format: str, resolution: int, limit: int, part: int, parts: int, frames: int,
            model_uri: str, encode_data: bool, prepared: Input[Dataset]):
    """One part of the validated, resized training shards, published below the dataset's folder; a part already
    published is kept. With `encode_data` the shards also hold the base model's latents and prompt embeddings."""
    from sspo.pipelines import shell

    shell.run_stage("prepare", source=source, format=source_format, resolution=resolution, limit=limit, part=part,
                    parts=parts, frames=frames, encode_with=model_uri if encode_data else "", output=prepared.uri)


@component
def merge_parts(source: str, source_format: str, parts: int, frames: int, prepared: Input[Dataset]):
    """The dataset's manifest, listing the shards of every published part: one dataset for training."""
    from sspo.pipelines import shell

    shell.run(["prepare", "--params", "", "--source", source, "--format", source_format, "--parts", parts,
               "--frames", frames, "--merge", "--output", prepared.uri])


@gpu_component
def train(model_uri: str, data: Input[Dataset], objective: str, steps: int, batch_size: int,
          gradient_accumulation_steps: int, learning_rate: float, beta: float, replay: str, save_every: int,
          sampler: str, sample_steps: int, lora_rank: int, replay_from: str, train_modules: str, pushgateway: str,
          registry_url: str, model_name: str, init_from_alias: str, replay_last_versions: int, gpus_per_node: int,
          accelerator: str, cpu_per_node: str, memory_per_node: str, run: Output[Model]) -> NamedTuple(
        "Trained", run_uri=str):
    """Fine-tune on this pod's `gpus_per_node` GPUs (one process each; 0 = on the CPU); checkpoints are published
    below the run as they are saved, so a retried pod resumes from the latest one. Returns the run's URL."""
    from sspo.pipelines import shell

    gpus = f"{gpus_per_node} × {accelerator}" if gpus_per_node else "no GPU"
    print(f"training in this pod: {gpus}, {cpu_per_node} CPUs, {memory_per_node} memory")
    options = shell.train_options(
        registry_url, model_name, init_from_alias, replay_last_versions, replay_from, model=model_uri,
        data=data.uri, output=run.uri, objective=objective, steps=steps, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate, beta=beta,
        replay=replay, save_every=save_every, sampler=sampler, sample_steps=sample_steps, lora_rank=lora_rank,
        train_modules=train_modules, pushgateway=pushgateway)
    shell.train_in_pod(gpus_per_node, **options)
    shell.finish_output(run)
    return (run.uri,)


@component
def train_nodes(model_uri: str, data: Input[Dataset], objective: str, steps: int, batch_size: int,
                gradient_accumulation_steps: int, learning_rate: float, beta: float, replay: str, save_every: int,
                sampler: str, sample_steps: int, lora_rank: int, replay_from: str, train_modules: str,
                pushgateway: str, registry_url: str, model_name: str, init_from_alias: str, replay_last_versions: int,
                num_nodes: int, gpus_per_node: int, accelerator: str, cpu_per_node: str, memory_per_node: str,
                trainer_runtime: str, image: str, run_id: str, run: Output[Model]) -> NamedTuple(
        "Trained", run_uri=str):
    """Fine-tune on `num_nodes` × `gpus_per_node` GPUs: a Kubeflow Trainer TrainJob running `image`, created,
    waited for and (when this step fails or is cancelled) deleted by this small pod. Returns the run's URL."""
    from sspo.pipelines import shell

    options = shell.train_options(
        registry_url, model_name, init_from_alias, replay_last_versions, replay_from, model=model_uri,
        data=data.uri, output=run.uri, objective=objective, steps=steps, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate, beta=beta,
        replay=replay, save_every=save_every, sampler=sampler, sample_steps=sample_steps, lora_rank=lora_rank,
        train_modules=train_modules, pushgateway=pushgateway)
    shell.train_on_nodes(num_nodes=num_nodes, gpus_per_node=gpus_per_node, accelerator=accelerator,
                         cpu=cpu_per_node, memory=memory_per_node, image=image, runtime=trainer_runtime,
                         run_id=run_id, **options)
    shell.finish_output(run)
    return (run.uri,)


@component
def register(registry_url: str, model_name: str, run_uri: str, data: Input[Dataset]) -> NamedTuple(
        "Registered", version=str, checkpoint=str):
    """Register the run's latest checkpoint as a new immutable version with the `candidate` alias."""
    from sspo.pipelines import shell

    return shell.register(registry_url, model_name, run_uri, data.uri)


@gpu_component
def evaluate(model_uri: str, checkpoint: str, registry_url: str, model_name: str, prompts: str, scorers: str,
             seeds: str, sample_steps: int, guidance: float, frames: int, pushgateway: str,
             evaluation: Output[Artifact],
             production_evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown]):
    """Base vs candidate on fixed prompts × seeds, and base vs the current production version with the very same
    settings (when there is one), so that the promotion compares like with like. Production goes first: the
    candidate's scores are the ones left on the Pushgateway."""
    from sspo.evaluate.results import Evaluation
    from sspo.pipelines import shell

    settings = dict(model=model_uri, prompts=prompts, scorers=scorers, seeds=seeds, sample_steps=sample_steps,
                    guidance=guidance, frames=frames, pushgateway=pushgateway)
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
