"""`sspo experiment`: the paper's comparison, every arm trained from the same base, data, budget and seeds.

Arms: sft, dpo (paired data), spin, sspo (uniform replay, sign SSR) and its ablations (replay initial / latest,
SSR off / indicator). Each (arm, seed) trains into `<output>/runs/<arm>-seed<k>` and is evaluated into
`<output>/eval/<arm>-seed<k>`; finished pieces are skipped, so an interrupted experiment resumes where it stopped
(a half-trained run resumes from its latest checkpoint). `phase` splits the work in two (run the cells, tabulate
them) so that experiments/dvc.yaml can track every cell as its own stage.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from sspo import config, run_store, storage
from sspo.config import ExperimentConfig
from sspo.errors import SSPOError
from sspo.evaluate import prompts as prompt_sets
from sspo.evaluate.evaluate import evaluate
from sspo.evaluate.results import Evaluation
from sspo.toy.world import ATTRIBUTES
from sspo.train.trainer import train

log = logging.getLogger(__name__)

ARMS = {
    "sft": {"objective": "sft"},
    "dpo": {"objective": "dpo"},
    "spin": {"objective": "spin"},
    "sspo": {"objective": "sspo", "replay": "uniform", "ssr": "sign"},
    "sspo-replay-initial": {"objective": "sspo", "replay": "initial", "ssr": "sign"},
    "sspo-replay-latest": {"objective": "sspo", "replay": "latest", "ssr": "sign"},
    "sspo-ssr-off": {"objective": "sspo", "replay": "uniform", "ssr": "off"},
    "sspo-ssr-indicator": {"objective": "sspo", "replay": "uniform", "ssr": "indicator"},
    # The paper's self-sampler (DDIM, 10 steps) against the default (DPM-Solver++, 4 steps): same loss, 2.5x the cost.
    "sspo-paper-sampler": {"objective": "sspo", "replay": "uniform", "ssr": "sign", "sampler": "ddim",
                           "sample_steps": 10},
}
PAPER_PICKSCORE = {
    "sft": 21.32, "spin": 21.55, "sspo": 21.57, "sspo-replay-initial": 21.41, "sspo-replay-latest": 21.34,
    "sspo-ssr-off": 20.88, "sspo-ssr-indicator": 21.56,
}
LABELS = {"heldout": "held-out", "color": "colour"}  # prompt sets and attributes as the table names them
# Two-sided 95% Student-t quantiles by degrees of freedom; beyond the table the normal quantile is close enough.
T_QUANTILE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def confidence_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (half-width 0 for a single seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    half = T_QUANTILE_975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, half


def label(name: str) -> str:
    return LABELS.get(name, name)


def compared_on(cfg: ExperimentConfig) -> tuple[str, list[str]]:
    """The scorer arms are compared by (the first) and the names of the prompt sets every cell is evaluated on; the
    table details the last set (the held-out prompts by default)."""
    return cfg.scorers[0], [prompt_sets.name_and_url(spec)[0] for spec in cfg.prompts]


def cell_urls(cfg: ExperimentConfig, arm: str, seed: int) -> tuple[str, str]:
    """Where one (arm, seed) trains and where it is evaluated."""
    name = f"{arm}-seed{seed}"
    return storage.join(cfg.output, "runs", name), storage.join(cfg.output, "eval", name)


def is_finished(cfg: ExperimentConfig, arm: str, seed: int) -> bool:
    return storage.is_published(cell_urls(cfg, arm, seed)[1])


def run_cell(cfg: ExperimentConfig, arm: str, seed: int) -> None:
    """Train and evaluate one (arm, seed), skipping what is already published."""
    run_url, eval_url = cell_urls(cfg, arm, seed)
    train_cfg = config.load("train", cfg.shared_params or None, {
        **ARMS[arm], "model": cfg.model, "data": cfg.data, "data_split": cfg.data_split, "output": run_url,
        "seed": seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
    })
    if not run_store.is_finished(run_url):
        train(train_cfg)
    if not is_finished(cfg, arm, seed):
        evaluate(config.load("evaluate", cfg.shared_params or None, {
            "model": cfg.model, "checkpoint": run_url, "output": eval_url, "seeds": cfg.eval_seeds,
            "sample_steps": cfg.eval_sample_steps, "scorers": cfg.scorers, "prompts": cfg.prompts,
        }))


def measure(cfg: ExperimentConfig, arm: str, seed: int) -> dict:
    """One finished cell's scores, win rates and mean SSR rate."""
    run_url, eval_url = cell_urls(cfg, arm, seed)
    results = Evaluation.read(eval_url)
    log_rows = run_store.read_log(run_url)
    ssr = [row["ssr_rate"] for row in log_rows if "ssr_rate" in row]
    scorer, splits = compared_on(cfg)
    return {
        "arm": arm, "seed": seed,
        **{f"{split}_score": results.score("trained", split, scorer) for split in splits},
        **{f"{split}_{key}": value for split in splits
           for key, value in results.attributes("trained", split, scorer).items()},
        **{f"base_{split}_score": results.score("base", split, scorer) for split in splits},
        **{f"win_rate_{split}": results.win_rate(split, scorer).rate for split in splits},
        "ssr_rate": float(np.mean(ssr)) if ssr else None,
    }


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("arm", "seed", "ssr_rate")]
    summary = {}
    for arm in dict.fromkeys(row["arm"] for row in rows):
        arm_rows = [row for row in rows if row["arm"] == arm]
        summary[arm] = {key: confidence_interval([row[key] for row in arm_rows]) for key in keys}
        rates = [row["ssr_rate"] for row in arm_rows if row["ssr_rate"] is not None]
        summary[arm]["ssr_rate"] = confidence_interval(rates) if rates else None
        summary[arm]["seeds"] = len(arm_rows)
    return summary


def flat_metrics(summary: dict, splits: list[str]) -> dict:
    """Per arm, each mean and its interval half-width as plain numbers: the shape `dvc metrics` and `dvc exp show`
    read."""
    flat = {}
    for arm, values in summary.items():
        flat[arm] = {"seeds": values["seeds"]}
        for key in (*(f"{split}_score" for split in splits), f"win_rate_{splits[-1]}", "ssr_rate"):
            if values[key] is not None:
                flat[arm][key], flat[arm][f"{key}_ci"] = values[key]
    return flat


def results_table(summary: dict, scorer: str, splits: list[str]) -> str:
    def cell(value) -> str:
        return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"

    base, detailed = next(iter(summary.values())), splits[-1]
    # only the toy world's attributes are ever reported, and only by a scorer that knows them (the oracle)
    attributes = [a for a in ATTRIBUTES if f"{detailed}_{a}" in base]
    keys = [*(f"{s}_score" for s in splits), *(f"{detailed}_{a}" for a in sorted(attributes)), f"win_rate_{detailed}",
            "ssr_rate"]
    columns = ["arm", "seeds", *(f"{label(s)} score" for s in splits),
               *(f"{label(a)} ({label(detailed)})" for a in sorted(attributes)),
               f"win rate vs base ({label(detailed)})", "mean SSR rate", "paper PickScore"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for arm, values in summary.items():
        cells = [arm, str(values["seeds"]), *(cell(values[key]) for key in keys), str(PAPER_PICKSCORE.get(arm, "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    base_scores = ", ".join(f"{label(s)} {base[f'base_{s}_score'][0]:.3f}" for s in splits)
    correct = f" ({', '.join(label(a) for a in attributes)} correct)" if attributes else ""
    lines.append(f"\nBase model: {base_scores}. Scores are {scorer} means{correct}; "
                 "± is the 95% t-interval over seeds.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: dict, directory: Path, scorer: str, splits: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, detailed, width = list(summary), splits[-1], 0.8 / len(splits)
    figure, axis = plt.subplots(figsize=(9, 4))
    for index, split in enumerate(splits):
        means = [summary[a][f"{split}_score"][0] for a in arms]
        errors = [summary[a][f"{split}_score"][1] for a in arms]
        offset = (index - (len(splits) - 1) / 2) * width
        axis.bar(np.arange(len(arms)) + offset, means, width, yerr=errors, capsize=3, label=f"{split} prompts")
    axis.axhline(summary[arms[0]][f"base_{detailed}_score"][0], color="grey", linestyle="--",
                 label=f"base ({label(detailed)})")
    axis.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    axis.set_ylabel(f"{scorer} score")
    axis.legend()
    figure.tight_layout()
    figure.savefig(directory / "scores.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 4))
    for arm in arms:
        points = [(row["ssr_rate"], row[f"{detailed}_score"]) for row in rows
                  if row["arm"] == arm and row["ssr_rate"] is not None]
        if points:
            axis.scatter(*zip(*points), label=arm)
    axis.set_xlabel("mean SSR rate over training")
    axis.set_ylabel(f"{label(detailed)} {scorer} score")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(directory / "ssr_vs_reward.png", dpi=120)
    plt.close(figure)


def run_experiment(cfg: ExperimentConfig) -> dict:
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise SSPOError(f"invalid config: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    cells = [(arm, seed) for arm in cfg.arms for seed in cfg.seeds]
    if cfg.phase != "report":
        for index, (arm, seed) in enumerate(cells, 1):
            log.info("experiment: arm %s seed %d (%d/%d)", arm, seed, index, len(cells))
            run_cell(cfg, arm, seed)
    if cfg.phase == "cells":
        return {"output": cfg.output, "arms": len(cfg.arms), "seeds": len(cfg.seeds)}
    missing = [f"{arm}-seed{seed}" for arm, seed in cells if not is_finished(cfg, arm, seed)]
    if missing:
        raise SSPOError(f"experiment cells not finished under {cfg.output}: {', '.join(missing)}; "
                        "run them first (--phase cells or all)")
    rows = [measure(cfg, arm, seed) for arm, seed in cells]
    summary = summarize(rows)
    scorer, splits = compared_on(cfg)
    with storage.output_folder(cfg.output) as directory:
        (directory / "results.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2))
        (directory / "metrics.json").write_text(json.dumps(flat_metrics(summary, splits), indent=2))
        table = results_table(summary, scorer, splits)
        (directory / "results.md").write_text(table)
        plot(rows, summary, directory, scorer, splits)
    return {"output": cfg.output, "arms": len(cfg.arms), "seeds": len(cfg.seeds), "table": table}
