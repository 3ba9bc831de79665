"""`sspo export`: the exported folder loads in diffusers as it is and generates what `sspo evaluate` generates for
the same checkpoint; its model card; a registry and an output on a real S3 server (moto); bad input."""

import copy
import hashlib
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DiffusionPipeline
from failure_tools import assert_nothing_published, assert_one_line_error
from s3server import BUCKET

from sspo import config, registry, storage
from sspo.cli import main
from sspo.evaluate.evaluate import generate, initial_noise
from sspo.evaluate.results import Evaluation
from sspo.export import LORA_WEIGHTS, MODEL_CARD
from sspo.models import apply_checkpoint, load_components
from sspo.run_store import resolve_checkpoint
from sspo.stages import run_evaluate, run_export, run_register, run_train

# Model family → the session fixture (conftest.py) that builds its toy base model. Every test below runs once per
# family: another family (SDXL) is one more entry.
FAMILY_BASES = {"sd": "base_model", "sdxl": "sdxl_model"}
# The two kinds of trained weights. The learning rates are high enough that two steps visibly change the images, so
# that equal images say something; LoRA alpha is not the rank, so a loader that dropped the adapter's alpha (and
# took alpha = rank) would generate other images.
RUNS = {"full": {"learning_rate": 1e-3}, "lora": {"lora_rank": 4, "lora_alpha": 8, "learning_rate": 3e-2}}
PROMPTS = ["a red circle on the left", "a blue square at the top", "a yellow triangle in the center"]
SEEDS = [0, 1]
SAMPLE_STEPS, GUIDANCE = 4, 4.0
# evaluate rounds (x + 1) * 127.5 to uint8, the pipeline returns x / 2 + 0.5 as floats, which we round after * 255:
# the same number up to float rounding, so a pixel may land one level away, never more.
TOLERANCE = 1  # uint8 levels: 1/255


@dataclass
class Family:
    name: str
    base: str
    runs: dict[str, str]  # "full" / "lora" → a two-step run on the base


@pytest.fixture(scope="module", params=sorted(FAMILY_BASES))
def family(request, prepared, tmp_path_factory) -> Family:
    base = request.getfixturevalue(FAMILY_BASES[request.param])
    runs = {}
    for kind, settings in RUNS.items():
        output = str(tmp_path_factory.mktemp(f"{request.param}-{kind}") / "run")
        run_train(config.load("train", None, {"model": base, "data": prepared, "output": output, "steps": 2,
                                              "batch_size": 2, "save_every": 1, "sample_steps": 2,
                                              "lr_warmup_steps": 1, **settings}))
        runs[kind] = output
    return Family(request.param, base, runs)


def export(**values) -> Path:
    run_export(config.load("export", None, values))
    return Path(values["output"])


def read_card(folder: Path) -> tuple[dict, str]:
    """The model card's YAML front matter and its Markdown body."""
    match = re.fullmatch(r"---\n(.*?\n)---\n(.*)", (folder / MODEL_CARD).read_text(), re.DOTALL)
    assert match, "the model card does not start with YAML front matter"
    return yaml.safe_load(match[1]), match[2]


def evaluated_images(base: str, checkpoint: str | None) -> np.ndarray:
    """What `sspo evaluate` generates (its generate() and initial noise): uint8, (prompts, seeds, H, W, 3)."""
    parts = load_components(base)
    unet = parts.unet
    if checkpoint:
        unet = copy.deepcopy(parts.unet)
        apply_checkpoint(unet, resolve_checkpoint(checkpoint))
    settings = config.load("evaluate", None, {"model": base, "seeds": SEEDS, "sample_steps": SAMPLE_STEPS,
                                              "guidance": GUIDANCE})
    return generate(parts, unet.eval(), PROMPTS, SEEDS, settings, desc="evaluate")


def pipeline_images(folder: Path, lora: bool) -> np.ndarray:
    """What diffusers generates from the exported folder with evaluate's sampler, steps, guidance and initial noise."""
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    if lora:
        pipe.load_lora_weights(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    jobs = [(p, s) for p in range(len(PROMPTS)) for s in SEEDS]  # evaluate's order: prompt-major, seed-minor
    latents = torch.stack([initial_noise(seed, p, shape) for p, seed in jobs])
    images = pipe([PROMPTS[p] for p, _ in jobs], latents=latents, num_inference_steps=SAMPLE_STEPS,
                  guidance_scale=GUIDANCE, output_type="np").images
    return (images * 255).round().astype(np.uint8).reshape(len(PROMPTS), len(SEEDS), *images.shape[1:])


def levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("weights", sorted(RUNS))
def test_the_exported_folder_generates_what_evaluate_generates(family, weights, tmp_path):
    lora = weights == "lora"
    output = export(checkpoint=family.runs[weights], output=str(tmp_path / "exported"))
    storage.verify_dir(output)

    evaluated = evaluated_images(family.base, family.runs[weights])
    assert levels_apart(evaluated, evaluated_images(family.base, None)) > 10 * TOLERANCE  # training changed them
    assert levels_apart(pipeline_images(output, lora), evaluated) <= TOLERANCE

    # Every file of the base is there unchanged, except the UNet that a full fine-tune replaces.
    base = storage.local_path(family.base)
    for file in base.rglob("*"):
        name = file.relative_to(base)
        if file.is_file() and name.parts[0] != storage.MANIFEST and (lora or name.parts[0] != "unet"):
            assert sha256(output / name) == sha256(file), name
    assert (output / LORA_WEIGHTS).exists() == lora

    front, body = read_card(output)
    assert front["weights"] == weights
    assert front["lora"] == ({"rank": 4, "alpha": 8} if lora else None)
    assert front["evaluation"] is None and "No evaluation was exported" in body
    assert ('load_lora_weights("' in body) == lora and 'DiffusionPipeline.from_pretrained("' in body


def test_the_model_card_records_lineage_and_the_evaluation(family, prepared, tmp_path, capsys):
    run = family.runs["full"]
    evaluation = tmp_path / "evaluation"
    run_evaluate(config.load("evaluate", None, {
        "model": family.base, "checkpoint": run, "output": str(evaluation), "seeds": [0], "sample_steps": 2,
        "prompts": ["toy:heldout"], "max_prompts": 4, "bootstrap_samples": 10}))
    output = export(checkpoint=run, evaluation=str(evaluation), output=str(tmp_path / "exported"))

    front, body = read_card(output)
    assert front["base_model"] == family.base and front["library_name"] == "diffusers"
    assert {"sspo", "diffusers", "text-to-image", "full-fine-tune"} <= set(front["tags"])
    assert any(tag.startswith("diffusers:") and tag.endswith("Pipeline") for tag in front["tags"])
    assert (front["objective"], front["weights"]) == ("sspo", "full")
    assert front["data"] == {"uri": prepared, "sha256": sha256(Path(prepared, storage.MANIFEST))}
    checkpoint = f"{run}/checkpoints/step-0000002"
    assert front["lineage"] == {
        "registry": None, "name": None, "version": None, "aliases": [], "exported_from": checkpoint, "run": run,
        "checkpoint": checkpoint, "step": 2, "parent": family.base, "replay_from": [], "code": None,
        "training_metrics": None}
    results = Evaluation.read(str(evaluation))
    scores = front["evaluation"]
    assert scores["uri"] == str(evaluation) and scores["checkpoint"] == checkpoint
    assert scores["sampler"] == {"scheduler": "DDIMScheduler", "steps": 2, "guidance": 4.0, "seeds": [0]}
    for model in ("base", "trained"):
        assert scores["scores"][model]["heldout"]["oracle"] == results.score(model, "heldout")
    assert scores["win_rate"]["oracle"]["all"]["rate"] == results.win_rate("all").rate
    assert scores["grids"] == ["samples/grid-heldout.png"]
    assert (output / "samples" / "grid-heldout.png").read_bytes() == (evaluation / "grid-heldout.png").read_bytes()
    assert "![grid-heldout](samples/grid-heldout.png)" in body and "num_inference_steps=2" in body

    # the evaluation of another checkpoint would put another model's scores in the card
    refused = tmp_path / "refused"
    assert main(["export", "--checkpoint", f"{run}/checkpoints/step-0000001", "--evaluation", str(evaluation),
                 "--output", str(refused)]) == 2
    assert_one_line_error(capsys.readouterr().err, "export", f"the evaluation {evaluation} is of {checkpoint}")
    assert_nothing_published(refused)


def test_an_alias_of_a_registry_on_s3_exports_to_s3(family, prepared, s3, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the repository's params.yaml
    root = f"s3://{BUCKET}/registry-{uuid.uuid4().hex[:8]}"
    run = family.runs["lora"]
    run_register(config.load("register", None, {"registry": root, "name": "toy", "checkpoint": run, "data": prepared,
                                                "metrics": f"{run}/metrics.json", "alias": "candidate"}))
    registry.set_alias(root, "toy", "production", "1")
    output = f"s3://{BUCKET}/exports-{uuid.uuid4().hex[:8]}/toy"
    assert main(["export", "--registry", root, "--name", "toy", "--alias", "production", "--output", output]) == 0
    assert storage.is_published(output)
    downloaded = storage.download_dir(output, tmp_path / "downloaded", require_manifest=True)

    assert levels_apart(pipeline_images(downloaded, lora=True), evaluated_images(family.base, run)) <= TOLERANCE
    front, _ = read_card(downloaded)
    lineage = front["lineage"]
    assert (lineage["registry"], lineage["name"], lineage["version"]) == (root, "toy", "1")
    assert lineage["aliases"] == ["candidate", "production"]
    assert lineage["exported_from"] == registry.version_url(root, "toy", "1")
    assert lineage["checkpoint"] == f"{run}/checkpoints/step-0000002"
    assert lineage["code"]["sspo_version"] and lineage["training_metrics"]["final_step"] == 2
    assert front["data"] == {"uri": prepared, "sha256": sha256(Path(prepared, storage.MANIFEST))}

    # the alias object is a checkpoint URL too, with the same lineage
    by_url = str(tmp_path / "by-url")
    capsys.readouterr()
    assert main(["export", "--checkpoint", registry.alias_url(root, "toy", "production"), "--output", by_url]) == 0
    assert read_card(Path(by_url))[0]["lineage"] == lineage

    # a published output is never overwritten; a bucket that does not exist is not created
    manifest = storage.read_bytes(storage.join(output, storage.MANIFEST))
    assert main(["export", "--registry", root, "--name", "toy", "--version", "1", "--output", output]) == 2
    assert_one_line_error(capsys.readouterr().err, "export", f"{output} already exists")
    assert storage.read_bytes(storage.join(output, storage.MANIFEST)) == manifest
    assert main(["export", "--registry", root, "--name", "toy", "--version", "1",
                 "--output", "s3://no-such-bucket/toy"]) == 2
    assert_one_line_error(capsys.readouterr().err, "export", "the bucket 'no-such-bucket' does not exist")


@pytest.fixture(scope="module")
def local_registry(trained_run, prepared, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("registry") / "registry")
    run_register(config.load("register", None, {"registry": root, "name": "toy", "checkpoint": trained_run,
                                                "data": prepared, "alias": "candidate"}))
    return root


@pytest.mark.parametrize("args, message", [
    (["--registry", "{registry}", "--name", "toy", "--version", "9"], "toy version 9 is not published in"),
    (["--registry", "{registry}", "--name", "toy", "--alias", "production"], "toy has no alias 'production'"),
    (["--registry", "{registry}", "--name", "toy"], "give exactly one of version and alias"),
    (["--checkpoint", "{run}", "--alias", "candidate"], "give registry too"),
    (["--checkpoint", "{base}"], "no published checkpoint at {base}"),
    (["--checkpoint", "{tmp}/nothing"], "no published checkpoint at {tmp}/nothing"),
    (["--checkpoint", "{run}", "--model", "{tmp}/nothing"], "cannot read the base model of"),
    (["--checkpoint", "{run}", "--evaluation", "{tmp}/nothing"], "not a finished evaluation: {tmp}/nothing"),
    (["--checkpoint", "{run}", "--output", "{tmp}/file/exported"], "{tmp}/file is a file, not a folder"),
    (["--checkpoint", "{run}", "--output", "dvc://models/exported"], "dvc:// URLs are read-only"),
    (["--checkpoint", "{run}", "--output", "{published}"], "{published} already exists"),
])
def test_bad_input_is_one_line_and_publishes_nothing(args, message, local_registry, trained_run, base_model,
                                                     tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    published = export(checkpoint=trained_run, output=str(tmp_path / "published"))
    before = (published / storage.MANIFEST).read_bytes()
    (tmp_path / "file").write_text("not a folder")
    names = {"registry": local_registry, "run": trained_run, "base": base_model, "tmp": tmp_path,
             "published": published}
    argv = [arg.format(**names) for arg in args]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "exported")]
    assert main(["export", *argv]) == 2
    assert_one_line_error(capsys.readouterr().err, "export", message.format(**names))
    assert_nothing_published(tmp_path / "exported")
    assert (published / storage.MANIFEST).read_bytes() == before
    storage.verify_dir(published)


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers
def test_a_real_process_writes_only_the_error_line(family, tmp_path):
    """Past the import of the pipeline class (which makes transformers warn about torchvision) and the base UNet's
    load: a base whose UNet weights are damaged."""
    base = tmp_path / "base"
    shutil.copytree(family.base, base)
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    output = tmp_path / "exported"
    result = subprocess.run([sys.executable, "-m", "sspo", "export", "--checkpoint", family.runs["lora"], "--model",
                             str(base), "--output", str(output)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "export", f"cannot load the UNet of the base model {base}")
    assert_nothing_published(output)
