import json

import numpy as np
import pytest
from PIL import Image

from sspo import config
from sspo.errors import SSPOError
from sspo.evaluate.results import Evaluation
from sspo.experiment import confidence_interval, run_experiment
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
    assert set(row) == {"arm", "seed", "heldout_score", "mine_score", "base_heldout_score", "base_mine_score",
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
