"""`sspo export`: a registry version, checkpoint or run as a complete diffusers folder, with a model card.

    <output>/model_index.json, vae/, text_encoder/, tokenizer/, scheduler/, ...   copied from the base model
    <output>/unet/                              full fine-tune: the trained UNet (its config.json and safetensors)
    <output>/pytorch_lora_weights.safetensors   LoRA: the adapter in diffusers' format, next to the base UNet
    <output>/README.md                          the model card: YAML front matter, then how to load the model
    <output>/samples/grid-<prompt set>.png      the image grids of the evaluation given with --evaluation
    <output>/manifest.json                      sha256 of every file, written last

The pipeline class is the one the base folder's model_index.json names, and every folder of the base is copied
except the UNet that a full fine-tune replaces, so every family whose pipeline diffusers knows (SD 1.x/2.x, SDXL with
its two text encoders) exports the same way. The output is staged and published manifest-last like every stage
output, and never overwritten.
"""

from __future__ import annotations

import inspect
import logging
import re
import shutil
from pathlib import Path

import yaml

from sspo import __version__, registry, storage
from sspo.config import ExportConfig
from sspo.errors import SSPOError
from sspo.evaluate.results import Evaluation
from sspo.prepare import disk_full_as_error
from sspo.run_store import CHECKPOINTS, config_of_checkpoint, resolve_checkpoint, run_of_checkpoint

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for in a folder
MODEL_CARD = "README.md"
MODEL_INDEX = "model_index.json"
SAMPLES = "samples"
UNET = "unet"
MOTION_ADAPTER = "motion_adapter"
GRID = re.compile(r"grid-[^/]+\.png")

# Importing a pipeline class makes transformers warn that image processors fall back to PIL without torchvision. The
# project does without torchvision on purpose (its PyPI build needs CUDA) and an export uses no image processor.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())


def resolve_source(cfg: ExportConfig) -> tuple[str, dict | None]:
    """The checkpoint URL to export and, when it is a registry version, what the registry says of it."""
    if cfg.registry:
        version = registry.resolve_version(cfg.registry, cfg.name, cfg.version, cfg.alias)
        checkpoint = registry.version_url(cfg.registry, cfg.name, version)
    else:
        checkpoint = resolve_checkpoint(cfg.checkpoint)
    return checkpoint, registry_record(checkpoint)


def registry_record(checkpoint: str) -> dict | None:
    """{registry, name, version, aliases, lineage} of a registry version folder (None for a plain checkpoint). A
    version pulled out of its registry keeps its lineage; its registry and aliases are then unknown (None, [])."""
    lineage_url = storage.join(checkpoint, registry.LINEAGE)
    if not storage.exists(lineage_url):
        return None
    lineage = storage.read_json(lineage_url)
    if not isinstance(lineage, dict) or not {"name", "version"} <= lineage.keys():
        raise SSPOError(f"{lineage_url} is not the lineage of a registry version (no name and version)")
    name, version = str(lineage["name"]), str(lineage["version"])
    # <root>/<name>/versions/<version>
    root = storage.parent(storage.parent(storage.parent(checkpoint)))
    in_registry = storage.join(root, name, "versions", version) == checkpoint.rstrip("/")
    aliases = sorted(alias for alias, target in registry.list_aliases(root, name).items()
                     if target == version) if in_registry else []
    return {"registry": root if in_registry else None, "name": name, "version": version, "aliases": aliases,
            "lineage": lineage}


def read_evaluation(url: str, checkpoint: str, record: dict | None) -> Evaluation:
    """The evaluation at `url`; it must have evaluated this checkpoint (or the run checkpoint the version was
    registered from), or the card would show another model's scores."""
    evaluation = Evaluation.read(url)
    evaluated = evaluation.data.get("checkpoint")
    same = {storage.absolute(checkpoint)}
    if record and record["lineage"].get("checkpoint"):
        same.add(storage.absolute(record["lineage"]["checkpoint"]))
    if evaluated is None or storage.absolute(evaluated) not in same:
        raise SSPOError(f"the evaluation {url} is of {evaluated or 'the base model only'}, not of {checkpoint}; "
                        "give an evaluation of the checkpoint you export")
    return evaluation


def copy_grids(evaluation_url: str, destination: Path) -> list[str]:
    """The evaluation's grid images, each checked against its manifest, copied into `destination`; their names."""
    manifest = storage.read_json(storage.join(evaluation_url, storage.MANIFEST))
    names = sorted(name for name in manifest.get("files", {}) if GRID.fullmatch(name))
    for name in names:
        destination.mkdir(exist_ok=True)
        shutil.copyfile(storage.fetch_file(evaluation_url, name), destination / name)
    return names


def diffusers_class(index: dict, key: str, base_url: str):
    """The diffusers class that model_index.json names for `key` ('_class_name': the pipeline)."""
    import diffusers

    entry = index.get(key)
    name = entry if key == "_class_name" else entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    found = getattr(diffusers, name, None) if isinstance(name, str) else None
    if found is None:
        raise SSPOError(f"{base_url}: its {MODEL_INDEX} names {key} {name!r}, which is no diffusers class")
    return found


def build_folder(checkpoint: str, checkpoint_dir: Path, info: dict, base_url: str, directory: Path) -> str:
    """Write the diffusers folder of the trained `checkpoint` (read into `checkpoint_dir`: full UNet or LoRA, as
    `info` says) on the base model at `base_url` into `directory`; returns the name of its pipeline class."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from sspo.models import load_checkpoint, read_model_index

    try:
        base = storage.fetch_dir(base_url)
    except SSPOError as err:
        raise SSPOError(f"cannot read the base model of {checkpoint} ({err}); --model names another") from None
    index = read_model_index(base, base_url)
    pipeline_class = diffusers_class(index, "_class_name", base_url)
    unet_class = diffusers_class(index, UNET, base_url)
    full = info["kind"] == "full"
    save_lora = getattr(pipeline_class, "save_lora_weights", None)
    if not full and (save_lora is None or "unet_lora_layers" not in inspect.signature(save_lora).parameters):
        raise SSPOError(f"{base_url}: {pipeline_class.__name__} has no UNet LoRA format to export a LoRA adapter in")
    try:
        unet = unet_class.from_pretrained(base, subfolder=UNET, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise SSPOError(f"cannot load the UNet of the base model {base_url}: {err}") from None
    load_checkpoint(unet, checkpoint_dir, info, checkpoint)

    # The export writes its own manifest and card; a full fine-tune's UNet folder is written whole below (a variant
    # or .bin file of the base UNet left beside it would hold the old weights).
    # A video model's motion_adapter/ holds the motion modules again: the trained ones replace the base's.
    motion = full and (base / MOTION_ADAPTER).is_dir()
    replaced = {storage.MANIFEST, MODEL_CARD, *([UNET] if full else []), *([MOTION_ADAPTER] if motion else [])}
    shutil.copytree(base, directory, dirs_exist_ok=True,
                    ignore=lambda folder, names: [n for n in names if Path(folder) == base and n in replaced])
    if full:
        unet.save_pretrained(directory / UNET, safe_serialization=True)
        if motion:
            unet.save_motion_modules(str(directory / MOTION_ADAPTER), safe_serialization=True)
    else:
        (adapter,) = unet.active_adapters()
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))
        # the adapter's config travels in the file's metadata, so the loader applies its alpha, not alpha = rank
        pipeline_class.save_lora_weights(directory, unet_lora_layers=layers,
                                         unet_lora_adapter_metadata=unet.peft_config[adapter].to_dict(),
                                         weight_name=LORA_WEIGHTS, safe_serialization=True)
    return pipeline_class.__name__


def run_folder(checkpoint: str | None) -> str | None:
    """The run a checkpoint was saved in (<run>/checkpoints/step-N), None for one outside a run."""
    if checkpoint and storage.parent(checkpoint).rstrip("/").endswith(f"/{CHECKPOINTS}"):
        return run_of_checkpoint(checkpoint)
    return None


def evaluation_summary(evaluation: Evaluation, url: str, grids: list[str]) -> dict:
    """An evaluation's scores and win rates as plain values, with the settings needed to reproduce them."""
    sampler = evaluation.data.get("sampler", {})
    return {
        "uri": url,
        "checkpoint": evaluation.data.get("checkpoint"),
        "sampler": {key: sampler.get(key) for key in ("scheduler", "steps", "guidance", "seeds")},
        "prompt_sets": evaluation.data.get("prompt_sets"),
        "scorers": evaluation.scorers,
        "scores": {model: {split: {scorer: evaluation.score(model, split, scorer) for scorer in evaluation.scorers}
                           for split in evaluation.splits} for model in evaluation.models},
        "win_rate": {scorer: {split: {key: getattr(evaluation.win_rate(split, scorer), key)
                                      for key in ("rate", "ci_low", "ci_high", "n")}
                              for split in evaluation.win_rate_splits} for scorer in evaluation.scorers},
        "grids": [f"{SAMPLES}/{name}" for name in grids],
    }


def card_metadata(checkpoint: str, info: dict, base_url: str, pipeline: str, record: dict | None,
                  evaluation: dict | None) -> dict:
    """The model card's front matter: Hugging Face's fields (base_model, library_name, tags, ...), then what the
    model was trained with and where it comes from."""
    lineage = record["lineage"] if record else {}
    train_config = lineage.get("train_config") or (config_of_checkpoint(checkpoint) if run_folder(checkpoint)
                                                    else None) or {}
    source = lineage.get("checkpoint") or checkpoint
    lora = {"rank": info["lora_rank"], "alpha": info["lora_alpha"]} if info["kind"] == "lora" else None
    return {
        "base_model": base_url,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": list(dict.fromkeys(["sspo", str(info.get("objective")), "text-to-image", "diffusers",
                                    f"diffusers:{pipeline}", "lora" if lora else "full-fine-tune"])),
        "objective": info.get("objective"),
        "weights": "lora" if lora else "full",
        "lora": lora,
        "data": lineage.get("data") or data_record(info.get("data")),
        "lineage": {
            "registry": record["registry"] if record else None,
            "name": record["name"] if record else None,
            "version": record["version"] if record else None,
            "aliases": record["aliases"] if record else [],
            "exported_from": checkpoint,
            "run": run_folder(source),
            "checkpoint": source,
            "step": info.get("step"),
            "parent": lineage.get("parent") or info.get("base_model"),
            "replay_from": train_config.get("replay_from") or [],
            "code": lineage.get("code"),
            "training_metrics": lineage.get("metrics"),
        },
        "exported_by": f"sspo {__version__}",
        "evaluation": evaluation,
    }


def data_record(uri: str | None) -> dict:
    """The training data's URI with the sha256 of its manifest, as the registry records it, where it is readable."""
    readable = bool(uri) and storage.exists(storage.join(uri, storage.MANIFEST))
    return registry.data_lineage(uri) if readable else {"uri": uri, "sha256": None}


def model_card(metadata: dict) -> str:
    """README.md: the metadata as YAML front matter, then a short text on what the model is and how to load it."""
    lineage, evaluation = metadata["lineage"], metadata["evaluation"]
    title = (f"{lineage['name']} version {lineage['version']}" if lineage["name"]
             else f"{metadata['objective']} fine-tune of {storage.local_path(metadata['base_model']).name}, step "
                  f"{lineage['step']}")
    weights = (f"A LoRA adapter (rank {metadata['lora']['rank']}, alpha {metadata['lora']['alpha']:g})"
               if metadata["lora"] else "A full fine-tune of the UNet")
    aliases = f" (aliases: {', '.join(lineage['aliases'])})" if lineage["aliases"] else ""
    # the snippet samples as the evaluation did; without one, as `sspo evaluate` does by default
    sampler = evaluation["sampler"] if evaluation else {"steps": 20, "guidance": 4.0}
    steps, guidance = sampler["steps"], sampler["guidance"]
    lines = [
        f"# {title}",
        "",
        f"{weights} of `{metadata['base_model']}`, trained with the `{metadata['objective']}` objective on "
        f"`{metadata['data']['uri']}`; checkpoint `{lineage['checkpoint']}` at step {lineage['step']}{aliases}. "
        f"Exported by {metadata['exported_by']}; the YAML front matter of this file records its whole lineage.",
        "",
        "## Use",
        "",
        "This folder is a complete diffusers model: the base model's components"
        + (" with the trained UNet." if not metadata["lora"] else
           f", unchanged, and the adapter in `{LORA_WEIGHTS}`."),
        "",
        "```python",
        "from diffusers import DDIMScheduler, DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")',
        *(['pipe.load_lora_weights("path/to/this/folder")'] if metadata["lora"] else []),
        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the sampler sspo evaluates with",
        f'image = pipe("your prompt", num_inference_steps={steps}, guidance_scale={guidance}).images[0]',
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation is None:
        lines.append("No evaluation was exported with this model (`sspo export --evaluation URL` adds the scores and "
                     "image grids of an `sspo evaluate` of its checkpoint).")
    else:
        lines += [f"From `{evaluation['uri']}`: {sampler['scheduler']}, {sampler['steps']} steps, guidance "
                  f"{sampler['guidance']}, seeds {sampler['seeds']}. Mean scores:", "",
                  "| model | prompt set | " + " | ".join(evaluation["scorers"]) + " |",
                  "|---|---|" + "---|" * len(evaluation["scorers"])]
        for model, by_split in evaluation["scores"].items():
            for split, by_scorer in by_split.items():
                lines.append(f"| {model} | {split} | " + " | ".join(_number(by_scorer[scorer])
                                                                    for scorer in evaluation["scorers"]) + " |")
        for scorer, by_split in evaluation["win_rate"].items():
            rates = ", ".join(f"{split} {_number(rate['rate'])} [{_number(rate['ci_low'])}, "
                              f"{_number(rate['ci_high'])}]" for split, rate in by_split.items())
            lines += ["", f"Win rate of the trained model over the base by {scorer} (95 % interval): {rates}."]
        lines += ["", *(f"![{Path(grid).stem}]({grid})" for grid in evaluation["grids"])]
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=120)
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"


def _number(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def export(cfg: ExportConfig) -> dict:
    """Build the diffusers folder and model card of the checkpoint `cfg` names, and publish it at `cfg.output`."""
    storage.require_writable(cfg.output)
    storage.require_bucket(cfg.output)
    if storage.is_local(cfg.output) and not storage.local_path(cfg.output).exists():
        storage.require_writable_file(cfg.output)  # a new folder there needs what a new file needs
    # Entered first, so an existing output is refused before any model is loaded.
    with disk_full_as_error(cfg.output), storage.staged_output(cfg.output) as (staging, manifest_extra):
        checkpoint, record = resolve_source(cfg)
        from sspo.models import read_checkpoint

        checkpoint_dir, info = read_checkpoint(checkpoint)
        base_url = cfg.model or info.get("base_model")
        if not base_url:
            raise SSPOError(f"{checkpoint} records no base model; pass --model URL")
        evaluation = read_evaluation(cfg.evaluation, checkpoint, record) if cfg.evaluation else None
        pipeline = build_folder(checkpoint, checkpoint_dir, info, base_url, staging)
        summary = None
        if evaluation:
            summary = evaluation_summary(evaluation, cfg.evaluation, copy_grids(cfg.evaluation, staging / SAMPLES))
        metadata = card_metadata(checkpoint, info, base_url, pipeline, record, summary)
        (staging / MODEL_CARD).write_text(model_card(metadata))
        result = {"output": cfg.output, "pipeline": pipeline, "weights": metadata["weights"],
                  "checkpoint": checkpoint, "version": metadata["lineage"]["version"]}
        manifest_extra.update({key: value for key, value in result.items() if key != "output"})
    return result
