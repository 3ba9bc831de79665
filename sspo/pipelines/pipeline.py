"""The SSPO pipeline: prepare → train → register → evaluate → compare → promote → export, the last two only when
the candidate evaluates better than the current production version, and export only when `export` is true.
Prepare fans out: `data_parts` groups of the source's files are prepared side by side, then merged into one dataset.
Train runs in one pod on `gpus_per_node` GPUs when `num_nodes` is 1, else as a Kubeflow Trainer TrainJob on
`num_nodes` × `gpus_per_node` GPUs; a retraining may start from a registry alias and replay earlier versions.

Defaults of the training and evaluation parameters are the stage configs' defaults (sspo/config.py).
"""


from typing import NamedTuple

from kfp import compiler, dsl, kubernetes

from sspo import config
from sspo.pipelines import CUDA_IMAGE, IMAGE, S3_SECRET, S3_SECRET_ENV, components, trainjob
from sspo.telemetry import PIPELINE_ENV

PIPELINE_NAME = "sspo-train-evaluate-promote"
IO_RETRY = {"num_retries": 3, "backoff_duration": "30s", "backoff_factor": 2.0}
# Per training node (a one-node training's pod, or each node of a TrainJob); requests = limits.
TRAIN_CPU = "8"
TRAIN_MEMORY = "32Gi"
SHM_SIZE = trainjob.SHM_SIZE
# The steps that run in the CUDA image; the TrainJob of a multi-node training runs it too.
GPU_EXECUTORS = ("exec-train", "exec-evaluate")

_prepare, _train, _evaluate = config.PrepareConfig(), config.TrainConfig(), config.EvaluateConfig()
PipelineOutputs = NamedTuple("Outputs", metrics=dsl.Metrics, report=dsl.Markdown, promoted=bool)

# The stage config field (by stage) each pipeline parameter becomes: the components below pass it on as
# `sspo STAGE --FIELD`. `sspo pipeline` builds these configs from the parameters and runs their validate() before
# anything is sent or run; sspo.pipelines.cli checks the parameters no config holds (promotion_split, min_*,
# the resources, the retraining sources).
STAGE_FIELDS = {
    "prepare": {"data_uri": "source", "data_format": "format", "resolution": "resolution", "data_limit": "limit",
                "data_parts": "parts", "data_frames": "frames"},
    "train": {"model_uri": "model", "objective": "objective", "steps": "steps", "batch_size": "batch_size",
              "gradient_accumulation_steps": "gradient_accumulation_steps", "learning_rate": "learning_rate",
              "beta": "beta", "replay": "replay", "save_every": "save_every", "sampler": "sampler",
              "sample_steps": "sample_steps", "lora_rank": "lora_rank", "replay_from": "replay_from",
              "train_modules": "train_modules", "pushgateway_url": "pushgateway"},
    "register": {"registry_url": "registry", "model_name": "name"},
    "evaluate": {"model_uri": "model", "eval_prompts": "prompts", "eval_scorers": "scorers", "eval_seeds": "seeds",
                 "eval_sample_steps": "sample_steps", "eval_guidance": "guidance", "eval_frames": "frames",
                 "pushgateway_url": "pushgateway"},
}
# The fields the pipeline fills at run time with the URIs of the artifacts it makes.
ARTIFACT_FIELDS = {"prepare": ("output",), "train": ("data", "output"),
                   "register": ("checkpoint", "data", "metrics", "output"), "evaluate": ("checkpoint", "output")}


def _with_s3(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_ENV)


def prepare_dataset(data_uri, data_format, resolution, data_limit, data_parts, data_frames, model_uri, encode_data):
    """The prepare steps, fanned out over the source's files: list the parts, prepare each part in a step of its own
    (side by side), merge them. Returns the dataset (the list step's output, which the parts and the merge fill)
    and the merge task, after which it is complete. A rerun served from the cache finds its parts in the same
    folder and prepares only those that are not published yet."""
    list_task = components.list_parts(source=data_uri, source_format=data_format, parts=data_parts,
                                      frames=data_frames)
    prepared = list_task.outputs["prepared"]
    with dsl.ParallelFor(list_task.outputs["Output"], name="prepare-parts") as part:
        prepare_task = components.prepare(source=data_uri, source_format=data_format, resolution=resolution,
                                          limit=data_limit, part=part, parts=data_parts, frames=data_frames,
                                          model_uri=model_uri, encode_data=encode_data, prepared=prepared)
    merge_task = components.merge_parts(source=data_uri, source_format=data_format, parts=data_parts,
                                        frames=data_frames, prepared=prepared).after(prepare_task)
    for task in (list_task, prepare_task, merge_task):
        _with_s3(task).set_retry(**IO_RETRY)
    return prepared, merge_task


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
    data_parts: int = _prepare.parts,
    data_frames: int = _prepare.frames,
    encode_data: bool = False,
    objective: str = _train.objective,
    steps: int = _train.steps,
    batch_size: int = _train.batch_size,
    gradient_accumulation_steps: int = _train.gradient_accumulation_steps,
    learning_rate: float = _train.learning_rate,
    beta: float = _train.beta,
    replay: str = _train.replay,
    save_every: int = _train.save_every,
    sampler: str = _train.sampler,
    sample_steps: int = _train.sample_steps,
    lora_rank: int = _train.lora_rank,
    replay_from: str = ",".join(_train.replay_from),
    train_modules: str = _train.train_modules,
    eval_prompts: str = ",".join(_evaluate.prompts),
    eval_scorers: str = ",".join(_evaluate.scorers),
    eval_seeds: str = ",".join(str(seed) for seed in _evaluate.seeds),
    eval_sample_steps: int = _evaluate.sample_steps,
    eval_guidance: float = _evaluate.guidance,
    eval_frames: int = _evaluate.frames,
    promotion_split: str = "heldout",
    min_win_rate: float = 0.5,
    min_improvement: float = 0.0,
    pushgateway_url: str = "",
    export: bool = True,
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    accelerator: str = "nvidia.com/gpu",
    cpu_per_node: str = TRAIN_CPU,
    memory_per_node: str = TRAIN_MEMORY,
    trainer_runtime: str = trainjob.DEFAULT_RUNTIME,
    eval_gpus: int = 1,
    init_from_alias: str = "",
    replay_last_versions: int = 0,
) -> PipelineOutputs:
    prepared, merge_task = prepare_dataset(data_uri, data_format, resolution, data_limit, data_parts, data_frames,
                                           model_uri, encode_data)

    training = dict(
        model_uri=model_uri, data=prepared, objective=objective, steps=steps, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate, beta=beta,
        replay=replay, save_every=save_every, sampler=sampler, sample_steps=sample_steps, lora_rank=lora_rank,
        replay_from=replay_from, train_modules=train_modules, pushgateway=pushgateway_url, registry_url=registry_url,
        model_name=model_name,
        init_from_alias=init_from_alias, replay_last_versions=replay_last_versions,
    )
    # kfp 2.17 hands a pipeline parameter to a condition's tasks only when a component input takes it, not when
    # only a resource setting uses it: both train components take the resource parameters as inputs.
    with dsl.If(num_nodes == 1, name="one-node"):
        train_task = components.train(**training, gpus_per_node=gpus_per_node, accelerator=accelerator,
                                      cpu_per_node=cpu_per_node, memory_per_node=memory_per_node)
        (train_task.set_accelerator_type(accelerator).set_accelerator_limit(gpus_per_node)
         .set_cpu_request(cpu_per_node).set_cpu_limit(cpu_per_node)
         .set_memory_request(memory_per_node).set_memory_limit(memory_per_node))
        # one process per GPU: NCCL and the DataLoader workers share memory through /dev/shm
        kubernetes.empty_dir_mount(train_task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=SHM_SIZE)
    with dsl.Else(name="several-nodes"):
        # A small pod that runs the training as a Kubeflow Trainer TrainJob in the CUDA image and waits for it.
        train_nodes_task = components.train_nodes(
            **training, num_nodes=num_nodes, gpus_per_node=gpus_per_node, accelerator=accelerator,
            cpu_per_node=cpu_per_node, memory_per_node=memory_per_node, trainer_runtime=trainer_runtime,
            image=CUDA_IMAGE, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    # A retried training resumes from its latest published checkpoint, so retrying costs little.
    for task in (train_task, train_nodes_task):
        task.after(merge_task)  # the dataset is complete once its parts are merged
        task.set_caching_options(False).set_retry(num_retries=1)

    register_task = components.register(
        registry_url=registry_url, model_name=model_name,
        run_uri=dsl.OneOf(train_task.outputs["run_uri"], train_nodes_task.outputs["run_uri"]), data=prepared)
    register_task.set_caching_options(False).set_retry(**IO_RETRY)

    evaluate_task = components.evaluate(
        model_uri=model_uri, checkpoint=register_task.outputs["checkpoint"], registry_url=registry_url,
        model_name=model_name, prompts=eval_prompts, scorers=eval_scorers, seeds=eval_seeds,
        sample_steps=eval_sample_steps, guidance=eval_guidance, frames=eval_frames, pushgateway=pushgateway_url,
    )
    evaluate_task.set_retry(**IO_RETRY).set_accelerator_type(accelerator).set_accelerator_limit(eval_gpus)

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

    for task in (train_task, train_nodes_task, register_task, evaluate_task, compare_task, promote_task, export_task):
        _with_s3(task)
    # the Pushgateway grouping key (no run id); the TrainJob's processes get it from the train_nodes step
    for task in (train_task, train_nodes_task, evaluate_task):
        task.set_env_variable(PIPELINE_ENV, PIPELINE_NAME)
    return PipelineOutputs(evaluate_task.outputs["metrics"], evaluate_task.outputs["report"], compare_task.output)


def compile_pipeline(path: str, image: str | None = None, cuda_image: str | None = None) -> str:
    """Write the pipeline's IR YAML to `path`; `image` replaces the CPU steps' image, `cuda_image` the image of the
    GPU steps and of the TrainJob."""
    compiler.Compiler().compile(sspo_pipeline, package_path=path)
    if image or cuda_image:
        _replace_images(path, {IMAGE: image or IMAGE, CUDA_IMAGE: cuda_image or CUDA_IMAGE})
    return path


def _replace_images(path: str, images: dict[str, str]) -> None:
    import yaml

    with open(path) as f:
        documents = list(yaml.safe_load_all(f))
    spec = documents[0]
    for executor in spec["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = images[executor["container"]["image"]]
    # the TrainJob's image, a constant input of the train_nodes task
    for component in [spec["root"], *spec["components"].values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            if task["componentRef"]["name"] == "comp-train-nodes":
                constant = task["inputs"]["parameters"]["image"]["runtimeValue"]
                constant["constant"] = images[constant["constant"]]
    with open(path, "w") as f:
        yaml.safe_dump_all(documents, f, sort_keys=False)
