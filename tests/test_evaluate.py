import base64
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from failure_tools import assert_nothing_published, assert_one_line_error, needs_root, sspo_on_full_disk
from sspo import config, storage
from sspo.cli import main
from sspo.errors import SSPOError
from sspo.evaluate import prompts, report
from sspo.evaluate.results import WinRate
from sspo.models import apply_checkpoint, lora_config
from sspo.run_store import CHECKPOINT_INFO, CHECKPOINT_WEIGHTS
from sspo.stages import run_evaluate, run_train

FAST = {"seeds": [0], "sample_steps": 2, "bootstrap_samples": 200}
TOY = {"max_prompts": 12}  # 12 prompts of each toy split keep it fast


@pytest.fixture(scope="module")
def checkpoint(base_model, prepared, tmp_path_factory):
    values = {"model": base_model, "data": prepared, "output": str(tmp_path_factory.mktemp("run") / "run"),
              "objective": "sft", "steps": 2, "batch_size": 4, "save_every": 2, "lr_warmup_steps": 1}
    return run_train(config.load("train", None, values))["checkpoint"]


def evaluate(output, **values):
    run_evaluate(config.load("evaluate", None, {"output": str(output), **FAST, **values}))
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.slow
def test_toy_report_has_grid_scores_and_win_rate_and_repeats_exactly(base_model, checkpoint, tmp_path):
    first = evaluate(tmp_path / "first", model=base_model, checkpoint=checkpoint, **TOY)
    second = evaluate(tmp_path / "second", model=base_model, checkpoint=checkpoint, **TOY)

    assert first["splits"] == ["train", "heldout"]
    assert first["sampler"] | {"scheduler": None} == {"scheduler": None, "steps": 2, "guidance": 4.0, "seeds": [0],
                                                       "latent_size": first["sampler"]["latent_size"]}
    assert {m: first["models"][m]["train"]["oracle"]["n"] for m in ("base", "trained")} == {"base": 12, "trained": 12}
    rows = [json.loads(line) for line in (tmp_path / "first" / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 24
    for model in ("base", "trained"):
        scores = [r["scores"]["oracle"]["score"] for r in rows if r["model"] == model and r["split"] == "heldout"]
        assert first["models"][model]["heldout"]["oracle"]["mean"] == pytest.approx(np.mean(scores))
        assert set(first["models"][model]["heldout"]["oracle"]) == {"mean", "n", "color", "shape", "position"}
        plot = (tmp_path / "first" / "plots" / f"{model}.csv").read_text().splitlines()
        assert plot[0] == "image,split,prompt,seed,oracle" and len(plot) == 25

    rate = first["win_rate"]["oracle"]["all"]
    paired = {(r["split"], r["prompt"]): r["scores"]["oracle"]["score"] for r in rows if r["model"] == "base"}
    outcomes = [(np.sign(r["scores"]["oracle"]["score"] - paired[r["split"], r["prompt"]]) + 1) / 2
                for r in rows if r["model"] == "trained"]
    assert rate["rate"] == pytest.approx(np.mean(outcomes)) and rate["n"] == 24
    assert rate["ci_low"] <= rate["rate"] <= rate["ci_high"]

    directory = tmp_path / "first"
    markdown = (directory / "report.md").read_text()
    assert "![grid train](grid-train.png)" in markdown and "![grid heldout](grid-heldout.png)" in markdown
    base_train = first["models"]["base"]["train"]["oracle"]["mean"]
    assert f"| base | {base_train:.3f} |" in markdown
    assert f"{rate['rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}] (n=24)" in markdown
    page = (directory / "report.html").read_text()
    grid_png = base64.b64encode((directory / "grid-train.png").read_bytes()).decode()
    assert f"data:image/png;base64,{grid_png}" in page and f"{rate['rate']:.3f} [" in page
    assert "win rate trained vs base" in (directory / "table.md").read_text()

    first["config"].pop("output"), second["config"].pop("output")
    assert first == second

    # Re-scoring the saved images reproduces every number and the grids.
    rescored = evaluate(tmp_path / "rescored", rescore=str(directory))
    assert rescored["rescored_from"] == str(directory)
    for key in ("model", "checkpoint", "sampler", "prompt_sets", "splits", "models", "win_rate"):
        assert rescored[key] == first[key], key
    assert (tmp_path / "rescored" / "grid-heldout.png").read_bytes() == (directory / "grid-heldout.png").read_bytes()
    assert f"images re-scored from: {directory}" in (tmp_path / "rescored" / "report.md").read_text()
    assert markdown == (tmp_path / "second" / "report.md").read_text()
    assert (directory / "grid-heldout.png").read_bytes() == (tmp_path / "second" / "grid-heldout.png").read_bytes()


def test_prompt_file_with_text_outside_the_toy_world(base_model, tmp_path):
    prompt_file = tmp_path / "mixed.jsonl"
    prompt_file.write_text('{"prompt": "a red circle on the left"}\n\n{"prompt": "a photo of an astronaut"}\n')
    metrics = evaluate(tmp_path / "eval", model=base_model, prompts=[f"file://{prompt_file}"], grid_prompts=1)
    assert metrics["splits"] == ["mixed"] and "win_rate" not in metrics
    assert metrics["models"]["base"]["mixed"]["oracle"]["n"] == 1
    rows = [json.loads(line) for line in (tmp_path / "eval" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle on the left", "a photo of an astronaut"]
    assert rows[0]["color"] == "red" and "color" not in rows[1]
    assert rows[1]["scores"]["oracle"]["score"] is None
    assert metrics["models"]["base"]["mixed"]["oracle"]["mean"] == rows[0]["scores"]["oracle"]["score"]


def test_prompt_sets_parse_and_reject_bad_input(tmp_path):
    (tmp_path / "parti.txt").write_text("a cat\n\n a dog \n")
    assert prompts.load(str(tmp_path / "parti.txt")).prompts == ["a cat", "a dog"]
    named = prompts.load(f"mine={tmp_path / 'parti.txt'}", limit=1)
    assert (named.name, named.prompts, named.scenes) == ("mine", ["a cat"], [None])
    heldout = prompts.load("toy:heldout")
    assert len(heldout.prompts) == 12 and all(scene is not None for scene in heldout.scenes)
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    for spec, message in [("toy:test", "toy:train, toy:validation, toy:heldout"), (str(tmp_path / "bad.jsonl"), 'no "prompt"'),
                          (str(tmp_path / "missing.txt"), "not found")]:
        with pytest.raises(SSPOError, match=message):
            prompts.load(spec)
    with pytest.raises(SSPOError, match="distinct names"):
        prompts.load_all([str(tmp_path / "parti.txt"), f"file://{tmp_path / 'parti.txt'}"])


def test_win_rate_counts_ties_half_and_bootstraps_over_pairs():
    candidate, base = np.array([1.0, 2.0, 3.0, np.nan, 5.0]), np.array([0.0, 2.0, 4.0, 1.0, 4.0])
    result = report.win_rate(candidate, base, samples=500, seed=7)
    outcomes = np.array([1.0, 0.5, 0.0, 1.0])
    resampled = outcomes[np.random.default_rng(7).integers(4, size=(500, 4))].mean(axis=1)
    assert result == WinRate(rate=0.625, ci_low=pytest.approx(np.percentile(resampled, 2.5)),
                             ci_high=pytest.approx(np.percentile(resampled, 97.5)), n=4, wins=2, ties=1, losses=1)
    assert report.win_rate(candidate, base, samples=500, seed=7) == result
    assert report.win_rate(np.array([np.nan]), np.array([1.0]), 10, 0).rate is None


def test_scorer_paths_from_the_command_line_and_params(tmp_path):
    cfg = config.load("evaluate", None, {"scorer_paths": "pickscore=s3://m/pick,hpsv2=/models/hps"})
    assert cfg.scorer_paths == {"pickscore": "s3://m/pick", "hpsv2": "/models/hps"}
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  scorers: [oracle, pickscore]\n  scorer_paths: {pickscore: /m/pick}\n")
    cfg = config.load("evaluate", str(params), {})
    assert cfg.scorers == ["oracle", "pickscore"] and cfg.scorer_paths == {"pickscore": "/m/pick"}
    with pytest.raises(SSPOError, match="scorer_paths"):
        config.load("evaluate", None, {"scorer_paths": "pickscore"})


def test_rescore_refuses_a_folder_that_is_not_an_evaluation(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SSPOError, match="not a finished evaluation"):
        evaluate(tmp_path / "out", rescore=str(tmp_path / "run"))
    assert not (tmp_path / "out").exists()


def sspo_evaluate(capsys, *args: str) -> tuple[int, str]:
    """`sspo evaluate ARGS` in this process, without the repository's params.yaml: (exit code, stderr)."""
    code = main(["evaluate", "--params", "", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("published", [True, False], ids=["published", "leftover"])
def test_existing_output_is_refused_before_any_model_is_loaded(tmp_path, capsys, published):
    output = tmp_path / "eval"
    output.mkdir()
    (output / "metrics.json").write_text("{}")
    if published:
        storage.publish_dir(output, str(output))
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    # The model does not exist: refusing the output first is the only way to get that message.
    code, stderr = sspo_evaluate(capsys, "--model", str(tmp_path / "no-model"), "--output", str(output))

    assert code == 2
    assert_one_line_error(stderr, "evaluate", "already exists" if published else "holds no complete output")
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before


def unet_of(model: str) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(model, subfolder="unet", use_safetensors=True)


def lora_weights(model: str, rank: int) -> dict[str, torch.Tensor]:
    """A LoRA adapter of `rank` for the model's UNet, in the trainer's format, with random (not zero) weights."""
    unet = unet_of(model)
    unet.add_adapter(lora_config(rank, rank), adapter_name="default")
    generator = torch.Generator().manual_seed(rank)
    return {name: torch.randn(tensor.shape, generator=generator)
            for name, tensor in get_peft_model_state_dict(unet, adapter_name="default").items()}


def publish_checkpoint(folder, weights: dict, kind: str, rank: int = 0) -> str:
    folder.mkdir()
    save_file(weights, str(folder / CHECKPOINT_WEIGHTS))
    info = {"kind": kind, "lora_rank": rank, "lora_alpha": rank, "step": 1}
    (folder / CHECKPOINT_INFO).write_text(json.dumps(info))
    return storage.publish_dir(folder, str(folder))


@pytest.mark.parametrize("claimed, held, message", [
    (("lora", 2), ("lora", 4), "does not hold a LoRA adapter (rank 2, alpha 2) for this model"),
    (("full", 0), ("lora", 4), "does not hold full UNet weights for this model"),
    (("lora", 4), ("full", 0), "does not hold a LoRA adapter (rank 4, alpha 4) for this model"),
], ids=["lora-rank", "full-holding-lora", "lora-holding-full"])
def test_checkpoint_whose_info_does_not_match_its_weights_is_a_one_line_error(base_model, tmp_path, capsys, claimed,
                                                                              held, message):
    """LoRA ranks that differ, and a full checkpoint holding an adapter, used to end in a RuntimeError from
    load_state_dict; an adapter checkpoint holding full weights loaded nothing and evaluated the base model."""
    weights = lora_weights(base_model, held[1]) if held[0] == "lora" else unet_of(base_model).state_dict()
    checkpoint = publish_checkpoint(tmp_path / "checkpoint", weights, *claimed)

    code, stderr = sspo_evaluate(capsys, "--model", base_model, "--checkpoint", checkpoint,
                                 "--output", str(tmp_path / "eval"), "--seeds", "0", "--sample-steps", "1")

    assert code == 2
    assert_one_line_error(stderr, "evaluate", f"{checkpoint}: unet.safetensors {message}")
    assert_nothing_published(tmp_path / "eval")


def test_lora_checkpoint_that_matches_its_weights_is_applied(base_model, tmp_path):
    weights = lora_weights(base_model, 4)
    checkpoint = publish_checkpoint(tmp_path / "checkpoint", weights, "lora", 4)
    unet = unet_of(base_model)

    assert apply_checkpoint(unet, checkpoint)["kind"] == "lora"

    loaded = get_peft_model_state_dict(unet, adapter_name="trained")
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[name], weights[name]) for name in weights)


@needs_root
def test_full_disk_publishes_nothing_and_names_the_path(base_model, tmp_path):
    """Every image, grid and report is a file of its own: they cannot all fit a 16 KB disk."""
    disk = tmp_path / "disk"

    result, left = sspo_on_full_disk(disk, "16k", "evaluate", "--params", "", "--model", base_model,
                                     "--output", str(disk / "eval"), "--prompts", "toy:train", "--max-prompts", "4",
                                     "--seeds", "0", "--sample-steps", "1", "--bootstrap-samples", "10")

    assert result.returncode == 2
    assert_one_line_error(result.stderr, "evaluate", f"cannot write {disk / 'eval'}: No space left on device",
                          str(disk))
    assert left == []
