"""The SSPO pipeline: prepare → train → register → evaluate → compare → promote → export, the last two only when
the candidate evaluates better than the current production version, and export only when `export` is true.

Defaults of the training and evaluation parameters are the stage configs' defaults (sspo/config.py).
"""


from typing import NamedTuple

from kfp import compiler, dsl, kubernetes

from sspo import config
from sspo.pipelines import components
from sspo.telemetry import PIPELINE_ENV

PIPELINE_NAME = "sspo-train-evaluate-promote"
# Every step reads and writes the object store with these credentials; they never travel as parameters.
S3_SECRET = "sspo-s3"
S3_SECRET_ENV = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                      "AWS_DEFAULT_REGION")}
IO_RETRY = {"num_retries": 3, "backoff_duration": "30s", "backoff_factor": 2.0}
TRAIN_CPU = ("4", "8")
TRAIN_MEMORY = ("16Gi", "32Gi")

_prepare, _train, _evaluate = config.PrepareConfig(), config.TrainConfig(), config.EvaluateConfig()
PipelineOutputs = NamedTuple("Outputs", metrics=dsl.Metrics, report=dsl.Markdown, promoted=bool)

# The stage config field (by stage) each pipeline parameter becomes: the components below pass it on as
# `sspo STAGE --FIELD`. `sspo pipeline` builds these configs from the parameters and runs their validate() before
# anything is sent or run; sspo.pipelines.cli checks the parameters no config holds (promotion_split, min_*).
STAGE_FIELDS = {
    "prepare": {"data_uri": "source", "data_format": "format", "resolution": "resolution", "data_limit": "limit"},
    "train": {"model_uri": "model", "objective": "objective", "steps": "steps", "batch_size": "batch_size",
              "learning_rate": "learning_rate", "beta": "beta", "replay": "replay", "save_every": "save_every",
              "sampler": "sampler", "sample_steps": "sample_steps", "lora_rank": "lora_rank",
              "replay_from": "replay_from", "pushgateway_url": "pushgateway"},
    "register": {"registry_url": "registry", "model_name": "name"},
    "evaluate": {"model_uri": "model", "eval_prompts": "prompts", "eval_scorers": "scorers", "eval_seeds": "seeds",
                 "eval_sample_steps": "sample_steps", "eval_guidance": "guidance", "pushgateway_url": "pushgateway"},
}
# The fields the pipeline fills at run time with the URIs of the artifacts it makes.
ARTIFACT_FIELDS = {"prepare": ("output",), "train": ("data", "output"),
                   "register": ("checkpoint", "data", "metrics", "output"), "evaluate": ("checkpoint", "output")}


def _with_s3(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_ENV)


@dsl.pipeline(name=PIPELINE_NAME, description="Fine-tune a diffusion model with SSPO, register it, evaluate it "
                                              "and promote it to production when it beats the current version.")
def sspo_pipeline(
    model_uri: str,
    data_uri: str,
    registry_url: str,
    model_name: str = "sspo",
    data_format: str = _prepare.format,
    resolution: int = _prepare.resolution,
    data_limit: int = _prepare.limit,
    objective: str = _train.objective,
    steps: int = _train.steps,
    batch_size: int = _train.batch_size,
    learning_rate: float = _train.learning_rate,
    beta: float = _train.beta,
    replay: str = _train.replay,
    save_every: int = _train.save_every,
    sampler: str = _train.sampler,
    sample_steps: int = _train.sample_steps,
    lora_rank: int = _train.lora_rank,
    replay_from: str = ",".join(_train.replay_from),
    eval_prompts: str = ",".join(_evaluate.prompts),
    eval_scorers: str = ",".join(_evaluate.scorers),
    eval_seeds: str = ",".join(str(seed) for seed in _evaluate.seeds),
    eval_sample_steps: int = _evaluate.sample_steps,
    eval_guidance: float = _evaluate.guidance,
    promotion_split: str = "heldout",
    min_win_rate: float = 0.5,
    min_improvement: float = 0.0,
    pushgateway_url: str = "",
    export: bool = True,
) -> PipelineOutputs:
    prepare_task = components.prepare(source=data_uri, source_format=data_format, resolution=resolution,
                                      limit=data_limit)
    prepare_task.set_retry(**IO_RETRY)

    train_task = components.train(
        model_uri=model_uri, data=prepare_task.outputs["prepared"], objective=objective, steps=steps,
        batch_size=batch_size, learning_rate=learning_rate, beta=beta, replay=replay, save_every=save_every,
        sampler=sampler, sample_steps=sample_steps, lora_rank=lora_rank, replay_from=replay_from,
        pushgateway=pushgateway_url,
    )
    # A retried training pod resumes from its latest published checkpoint, so retrying costs little.
    (train_task.set_caching_options(False)
     .set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
     .set_cpu_request(TRAIN_CPU[0]).set_cpu_limit(TRAIN_CPU[1])
     .set_memory_request(TRAIN_MEMORY[0]).set_memory_limit(TRAIN_MEMORY[1])
     .set_retry(num_retries=1))

    register_task = components.register(registry_url=registry_url, model_name=model_name,
                                        run=train_task.outputs["run"], data=prepare_task.outputs["prepared"])
    register_task.set_caching_options(False).set_retry(**IO_RETRY)

    evaluate_task = components.evaluate(
        model_uri=model_uri, checkpoint=register_task.outputs["checkpoint"], registry_url=registry_url,
        model_name=model_name, prompts=eval_prompts, scorers=eval_scorers, seeds=eval_seeds,
        sample_steps=eval_sample_steps, guidance=eval_guidance, pushgateway=pushgateway_url,
    )
    evaluate_task.set_retry(**IO_RETRY)

    # The production alias moves between runs: the comparison is never served from cache.
    compare_task = components.compare(
        evaluation=evaluate_task.outputs["evaluation"],
        production_evaluation=evaluate_task.outputs["production_evaluation"], split=promotion_split,
        min_win_rate=min_win_rate, min_improvement=min_improvement,
    )
    compare_task.set_caching_options(False).set_retry(**IO_RETRY)

    with dsl.If(compare_task.output == True, name="evaluation-improves"):  # noqa: E712 (a KFP condition)
        promote_task = components.promote(registry_url=registry_url, model_name=model_name,
                                          version=register_task.outputs["version"])
        promote_task.set_caching_options(False).set_retry(**IO_RETRY)
        with dsl.If(export == True, name="export-enabled"):  # noqa: E712 (a KFP condition)
            # after the promotion, so that the model card lists the production alias
            export_task = components.export(registry_url=registry_url, model_name=model_name,
                                            version=register_task.outputs["version"],
                                            evaluation=evaluate_task.outputs["evaluation"]).after(promote_task)
            export_task.set_caching_options(False).set_retry(**IO_RETRY)

    for task in (prepare_task, train_task, register_task, evaluate_task, compare_task, promote_task, export_task):
        _with_s3(task)
    for task in (train_task, evaluate_task):
        task.set_env_variable(PIPELINE_ENV, PIPELINE_NAME)  # the Pushgateway grouping key: no run id
    return PipelineOutputs(evaluate_task.outputs["metrics"], evaluate_task.outputs["report"], compare_task.output)


def compile_pipeline(path: str, image: str | None = None) -> str:
    """Write the pipeline's IR YAML to `path`; `image` replaces the components' image."""
    compiler.Compiler().compile(sspo_pipeline, package_path=path)
    if image:
        _replace_image(path, image)
    return path


def _replace_image(path: str, image: str) -> None:
    import yaml

    with open(path) as f:
        documents = list(yaml.safe_load_all(f))
    for executor in documents[0]["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    with open(path, "w") as f:
        yaml.safe_dump_all(documents, f, sort_keys=False)
