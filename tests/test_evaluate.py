import base64
import json

import numpy as np
import pytest

from sspo import config
from sspo.errors import SSPOError
from sspo.evaluate import prompts, report
from sspo.evaluate.results import WinRate
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
    for spec, message in [("toy:test", "toy:train and toy:heldout"), (str(tmp_path / "bad.jsonl"), 'no "prompt"'),
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
