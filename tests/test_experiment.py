import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sspo import config
from sspo.errors import SSPOError
from sspo.evaluate.results import Evaluation
from sspo.experiment import choose_settings, confidence_interval, grid_cells, run_experiment
from sspo.stages import run_prepare
from sspo.toy import oracle
from sspo.toy.world import Scene
from test_scorers import clip_dir  # noqa: F401  (a tiny CLIP: a reward model other than the oracle)


def test_confidence_interval_matches_student_t():
    mean, half = confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.303 * 1.0 / 3**0.5, rel=1e-3)
    assert confidence_interval([0.5]) == (0.5, 0.0)


@pytest.mark.slow
def test_experiment_trains_every_arm_and_resumes(toy_world, base_model, tmp_path):
    paired = str(tmp_path / "pairs")
    run_prepare(config.load("prepare", None, {"source": toy_world, "output": paired, "keep_pairs": True}))
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  sample_steps: 2\n  save_every: 1\n  lr_warmup_steps: 0\n")
    values = {"model": base_model, "data": paired, "output": str(tmp_path / "exp"), "shared_params": str(params),
              "arms": "sft,dpo,sspo-ssr-indicator", "seeds": "0,1", "steps": 2, "batch_size": 2, "eval_seeds": "0", "eval_sample_steps": 2}
    summary = run_experiment(config.load("experiment", None, values))
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    arms = ["sft", "dpo", "sspo-ssr-indicator"]
    assert [(row["arm"], row["seed"]) for row in results["runs"]] == [(arm, seed) for arm in arms for seed in (0, 1)]
    assert (tmp_path / "exp" / "scores.png").stat().st_size > 0
    assert (tmp_path / "exp" / "ssr_vs_reward.png").stat().st_size > 0
    for arm in arms:
        assert f"| {arm} | 2 |" in summary["table"]
    assert all(row["ssr_rate"] is not None for row in results["runs"] if row["arm"].startswith("sspo"))

    # The table's scores are those of the saved images: re-scoring the PNGs gives every run's numbers again.
    for row in results["runs"]:
        cell = tmp_path / "exp" / "eval" / f"{row['arm']}-seed{row['seed']}"
        entries = [json.loads(line) for line in (cell / "index.jsonl").read_text().splitlines()]
        for split in ("train", "heldout"):
            rescored = [oracle.score(Image.open(cell / entry["file"]),
                                     Scene(entry["color"], entry["shape"], entry["position"]))["score"]
                        for entry in entries if entry["model"] == "trained" and entry["split"] == split]
            assert row[f"{split}_score"] == pytest.approx(np.mean(rescored))

    # A rerun finds every arm finished: nothing is trained or evaluated again, the numbers are the same.
    marker = tmp_path / "exp" / "eval" / "sft-seed0" / "metrics.json"
    before = marker.stat().st_mtime_ns
    again = run_experiment(config.load("experiment", None, values))
    assert marker.stat().st_mtime_ns == before
    assert again["table"] == summary["table"]

    # The records alone (what git keeps of a grid run elsewhere) give the same table, and no cell runs again.
    shutil.rmtree(tmp_path / "exp" / "runs")
    shutil.rmtree(tmp_path / "exp" / "eval")
    assert run_experiment(config.load("experiment", None, values))["table"] == summary["table"]
    assert not (tmp_path / "exp" / "runs").exists()

    # A record made with other settings is refused, naming them, rather than tabulated.
    with pytest.raises(SSPOError, match=r"sft-seed0.json was recorded with other settings \(evaluate.2.seeds\)"):
        run_experiment(config.load("experiment", None, {**values, "eval_seeds": "1"}))


def test_configured_scorers_and_prompt_sets_are_evaluated_and_tabulated(base_model, prepared, clip_dir, tmp_path):
    (tmp_path / "mine.txt").write_text("a red circle on the left\na blue square at the top\n")
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  sample_steps: 2\n  lr_warmup_steps: 0\nevaluate:\n  max_prompts: 2\n"
                      f"  bootstrap_samples: 20\n  scorer_paths: {{clipscore: {clip_dir}}}\n")
    values = {"model": base_model, "data": prepared, "output": str(tmp_path / "exp"), "shared_params": str(params),
              "arms": "sft", "seeds": "0", "steps": 1, "batch_size": 2, "eval_seeds": "0", "eval_sample_steps": 2,
              "scorers": "clipscore,oracle", "prompts": f"toy:heldout,mine={tmp_path / 'mine.txt'}"}
    table = run_experiment(config.load("experiment", None, values))["table"]

    evaluation = Evaluation.read(str(tmp_path / "exp" / "eval" / "sft-seed0"))
    assert (evaluation.scorers, evaluation.splits) == (["clipscore", "oracle"], ["heldout", "mine"])
    (row,) = json.loads((tmp_path / "exp" / "results.json").read_text())["runs"]
    # compared by the first scorer, which reports no per-attribute values
    assert set(row) == {"arm", "seed", "step", "heldout_score", "mine_score", "base_heldout_score", "base_mine_score",
                        "win_rate_heldout", "win_rate_mine", "ssr_rate"}
    assert row["mine_score"] == evaluation.score("trained", "mine", "clipscore")
    assert row["win_rate_mine"] == evaluation.win_rate("mine", "clipscore").rate
    assert table.startswith("| arm | seeds | held-out score | mine score | win rate vs base (mine) | mean SSR rate |")
    assert "Scores are clipscore means; ±" in table
    flat = json.loads((tmp_path / "exp" / "metrics.json").read_text())["sft"]
    assert set(flat) == {"seeds", "heldout_score", "heldout_score_ci", "mine_score", "mine_score_ci", "win_rate_mine",
                         "win_rate_mine_ci"}


def test_unknown_arm_is_one_clear_error(tmp_path):
    with pytest.raises(SSPOError, match="unknown arm"):
        run_experiment(config.load("experiment", None, {"arms": "sft,magic", "output": str(tmp_path)}))


def test_report_names_unfinished_cells(tmp_path):
    values = {"arms": "sft,dpo", "seeds": "0", "output": str(tmp_path), "phase": "report"}
    with pytest.raises(SSPOError, match="not finished .*: sft-seed0, dpo-seed0"):
        run_experiment(config.load("experiment", None, values))


@pytest.mark.slow
def test_sweep_chooses_settings_that_a_tuned_grid_trains_with(base_model, prepared, tmp_path):
    """A sweep on the validation prompts writes each arm's best settings; a grid tuned with them trains each arm with
    those, evaluates its checkpoints at eval_at_steps and compares every arm with sft seed by seed."""
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  sample_steps: 2\n  save_every: 1\n  lr_warmup_steps: 0\n"
                      "evaluate:\n  max_prompts: 2\n  bootstrap_samples: 20\n")
    common = {"model": base_model, "data": prepared, "shared_params": str(params), "arms": "sft,sspo-ssr-sft",
              "batch_size": 2, "eval_seeds": "0", "eval_sample_steps": 2}
    sweep = {**common, "output": str(tmp_path / "sweep"), "seeds": "0", "steps": 1, "prompts": "toy:validation",
             "sweep_beta": "100,400", "sweep_learning_rate": "0.0001"}
    table = run_experiment(config.load("experiment", None, sweep))["table"]
    runs = sorted(path.name for path in (tmp_path / "sweep" / "runs").iterdir())
    assert runs == ["sft-lr0.0001-seed0", "sspo-ssr-sft-beta100-lr0.0001-seed0", "sspo-ssr-sft-beta400-lr0.0001-seed0"]
    summary = json.loads((tmp_path / "sweep" / "results.json").read_text())["summary"]
    chosen = json.loads((tmp_path / "sweep" / "chosen.json").read_text())
    assert chosen["chosen_by"] == "mean oracle score on the validation prompts"
    best = max(("sspo-ssr-sft-beta100-lr0.0001", "sspo-ssr-sft-beta400-lr0.0001"),
               key=lambda name: summary[name]["validation_score"][0])
    assert chosen["arms"]["sspo-ssr-sft"]["variant"] == best
    assert chosen["arms"]["sft"] == {"learning_rate": 0.0001, "variant": "sft-lr0.0001",
                                     "score": summary["sft-lr0.0001"]["validation_score"][0]}
    assert f"sspo-ssr-sft → {best}" in table

    tuned = {**common, "output": str(tmp_path / "final"), "seeds": "0,1", "steps": 2, "eval_at_steps": "1",
             "prompts": "toy:train,toy:heldout", "tuned": str(tmp_path / "sweep" / "chosen.json")}
    table = run_experiment(config.load("experiment", None, tuned))["table"]
    recorded = json.loads((tmp_path / "final" / "runs" / "sspo-ssr-sft-seed1" / "config.json").read_text())
    assert (recorded["beta"], recorded["learning_rate"]) == (chosen["arms"]["sspo-ssr-sft"]["beta"], 0.0001)
    assert (tmp_path / "final" / "eval" / "sft-seed0-step1" / "metrics.json").exists()
    results = json.loads((tmp_path / "final" / "results.json").read_text())
    assert sorted({row["step"] for row in results["runs"]}) == [1, 2]
    rows = {(row["arm"], row["seed"]): row for row in results["runs"] if row["step"] == 2}
    differences = [rows["sspo-ssr-sft", seed]["heldout_score"] - rows["sft", seed]["heldout_score"] for seed in (0, 1)]
    assert results["paired_vs_sft"]["2"]["sspo-ssr-sft"]["heldout"][:2] == pytest.approx(
        list(confidence_interval(differences)))
    assert "### After 1 steps" in table and "arm − sft" in table
    assert (tmp_path / "final" / "score_over_steps.png").stat().st_size > 0


def test_tuned_settings_must_cover_every_arm(tmp_path):
    (tmp_path / "chosen.json").write_text(json.dumps({"arms": {"sft": {"learning_rate": 0.0001}}}))
    values = {"arms": "sft,dpo", "output": str(tmp_path / "exp"), "tuned": str(tmp_path / "chosen.json")}
    with pytest.raises(SSPOError, match="chose no settings for dpo"):
        run_experiment(config.load("experiment", None, values))


def test_a_tie_in_the_sweep_goes_to_the_first_listed_setting(tmp_path):
    """Equal means that float summation left a last bit apart still tie: the first variant listed is chosen."""
    cfg = config.load("experiment", None, {"arms": "sspo", "seeds": "100", "output": str(tmp_path),
                                           "sweep_beta": "100,400", "sweep_learning_rate": "0.0004,0.0001",
                                           "prompts": "toy:validation"})
    cells = grid_cells(cfg)
    scores = {"sspo-beta100-lr0.0004": 0.6805555555555554, "sspo-beta100-lr0.0001": 0.5,
              "sspo-beta400-lr0.0004": 0.5, "sspo-beta400-lr0.0001": 0.6805555555555555}
    summary = {name: {"validation_score": (score, 0.0)} for name, score in scores.items()}
    chosen = choose_settings(cfg, cells, summary, "validation")["arms"]["sspo"]
    assert (chosen["variant"], chosen["beta"], chosen["learning_rate"]) == ("sspo-beta100-lr0.0004", 100.0, 0.0004)
