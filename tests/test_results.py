"""Evaluation results (metrics.json) as one typed object, on a real evaluation of the session's toy model."""

import json
from pathlib import Path

import numpy as np
import pytest

from sspo import config
from sspo.errors import SSPOError
from sspo.evaluate.results import ALL, METRICS_FILE, Evaluation, WinRate
from sspo.stages import run_evaluate


@pytest.fixture(scope="module")
def evaluation(base_model, trained_run, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("results") / "eval"
    run_evaluate(config.load("evaluate", None, {
        "model": base_model, "checkpoint": trained_run, "output": str(output), "seeds": [0, 1], "sample_steps": 2,
        "max_prompts": 3, "bootstrap_samples": 50}))
    return output


def index_scores(directory: Path, model: str, split: str) -> list:
    rows = [json.loads(line) for line in (directory / "index.jsonl").read_text().splitlines()]
    return [row["scores"]["oracle"] for row in rows if row["model"] == model and row["split"] == split]


def test_reads_answers_and_writes_back_the_same_bytes(evaluation, tmp_path):
    results = Evaluation.read(f"file://{evaluation}")
    assert (results.scorers, results.primary_scorer) == (["oracle"], "oracle")
    assert results.splits == ["train", "heldout"] and results.models == ["base", "trained"]
    assert results.win_rate_splits == ["train", "heldout", ALL]
    for model in results.models:
        scores = index_scores(evaluation, model, "heldout")
        assert results.score(model, "heldout") == pytest.approx(np.mean([s["score"] for s in scores]))
        assert results.attributes(model, "heldout") == pytest.approx(
            {key: np.mean([s[key] for s in scores]) for key in ("color", "shape", "position")})

    trained, base = ([s["score"] for s in index_scores(evaluation, m, "train")] for m in ("trained", "base"))
    outcomes = (np.sign(np.subtract(trained, base)) + 1) / 2
    rate = results.win_rate("train", "oracle")
    assert isinstance(rate, WinRate) and rate.rate == pytest.approx(outcomes.mean())
    assert (rate.n, rate.wins, rate.ties, rate.losses) == (6, sum(outcomes == 1), sum(outcomes == 0.5),
                                                          sum(outcomes == 0))
    assert rate.ci_low <= rate.rate <= rate.ci_high
    assert results.win_rate(ALL).n == 12

    scalars = results.scalars()
    assert scalars["models.trained.heldout.oracle.mean"] == results.score("trained", "heldout")
    assert scalars["models.base.train.oracle.n"] == 6
    assert scalars["win_rate.oracle.all.rate"] == results.win_rate(ALL).rate
    assert all(isinstance(value, float) for value in scalars.values())

    results.write(tmp_path)
    assert (tmp_path / METRICS_FILE).read_bytes() == (evaluation / METRICS_FILE).read_bytes()


def test_a_missing_entry_is_one_clear_error(evaluation, trained_run, tmp_path):
    results = Evaluation.read(str(evaluation))
    for ask, message in [
        (lambda: results.score("candidate", "heldout"), "no oracle score of model 'candidate' on prompt set 'heldout'"),
        (lambda: results.score("trained", "parti"), "prompt sets: train, heldout"),
        (lambda: results.attributes("base", "train", "pickscore"), "no pickscore score .* scorers: oracle"),
        (lambda: results.win_rate("parti"), "no oracle win rate on prompt set 'parti' .*win rates on: train, heldout"),
    ]:
        with pytest.raises(SSPOError, match=message):
            ask()

    base_only = Evaluation.new({}, ["oracle"], ["heldout"], ["base"])
    base_only.add_scores("base", "heldout", {"oracle": {"mean": None, "n": 0}})
    assert base_only.score("base", "heldout") is None and base_only.scalars() == {"models.base.heldout.oracle.n": 0.0}
    with pytest.raises(SSPOError, match="only the base model was evaluated"):
        base_only.win_rate("heldout")

    with pytest.raises(SSPOError, match=f"not a finished evaluation: {tmp_path} .*not found"):
        Evaluation.read(str(tmp_path))
    with pytest.raises(SSPOError, match="holds no evaluation results"):
        Evaluation.read(trained_run)  # a training run's metrics.json
