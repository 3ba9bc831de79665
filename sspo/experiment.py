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

from sspo import config, storage
from sspo.config import ExperimentConfig
from sspo.errors import SSPOError
from sspo.evaluate.evaluate import evaluate
from sspo.train.trainer import run_folder, train

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
}
PAPER_PICKSCORE = {
    "sft": 21.32, "spin": 21.55, "sspo": 21.57, "sspo-replay-initial": 21.41, "sspo-replay-latest": 21.34,
    "sspo-ssr-off": 20.88, "sspo-ssr-indicator": 21.56,
}
RESULT_FILES = ("results.json", "results.md", "metrics.json", "scores.png", "ssr_vs_reward.png")
# Two-sided 95% Student-t quantiles by degrees of freedom; beyond the table the normal quantile is close enough.
T_QUANTILE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def confidence_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (half-width 0 for a single seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    half = T_QUANTILE_975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, half


def cell_urls(cfg: ExperimentConfig, arm: str, seed: int) -> tuple[str, str]:
    """Where one (arm, seed) trains and where it is evaluated."""
    name = f"{arm}-seed{seed}"
    return storage.join(cfg.output, "runs", name), storage.join(cfg.output, "eval", name)


def is_finished(cfg: ExperimentConfig, arm: str, seed: int) -> bool:
    return storage.exists(storage.join(cell_urls(cfg, arm, seed)[1], storage.MANIFEST))


def run_cell(cfg: ExperimentConfig, arm: str, seed: int) -> None:
    """Train and evaluate one (arm, seed), skipping what is already published."""
    run_url, eval_url = cell_urls(cfg, arm, seed)
    train_cfg = config.load("train", cfg.shared_params or None, {
        **ARMS[arm], "model": cfg.model, "data": cfg.data, "data_split": cfg.data_split, "output": run_url,
        "seed": seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
    })
    if not storage.exists(storage.join(run_url, "metrics.json")):
        train(train_cfg)
    if not is_finished(cfg, arm, seed):
        evaluate(config.load("evaluate", cfg.shared_params or None, {
            "model": cfg.model, "checkpoint": run_url, "output": eval_url, "seeds": cfg.eval_seeds,
            "sample_steps": cfg.eval_sample_steps,
        }))


def measure(cfg: ExperimentConfig, arm: str, seed: int) -> dict:
    """One finished cell's scores, win rates and mean SSR rate."""
    run_url, eval_url = cell_urls(cfg, arm, seed)
    metrics = storage.read_json(storage.join(eval_url, "metrics.json"))
    log_rows = [json.loads(line) for line in storage.read_text(storage.join(run_url, "train_log.jsonl")).splitlines()]
    ssr = [row["ssr_rate"] for row in log_rows if "ssr_rate" in row]
    trained, base = metrics["models"]["trained"], metrics["models"]["base"]
    splits = ("train", "heldout")
    return {
        "arm": arm, "seed": seed,
        **{f"{split}_score": trained[split]["oracle"]["mean"] for split in splits},
        **{f"{split}_{key}": trained[split]["oracle"][key] for split in splits for key in ("color", "shape", "position")},
        **{f"base_{split}_score": base[split]["oracle"]["mean"] for split in splits},
        **{f"win_rate_{split}": metrics["win_rate"]["oracle"][split]["rate"] for split in splits},
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


def flat_metrics(summary: dict) -> dict:
    """Per arm, each mean and its interval half-width as plain numbers: the shape `dvc metrics` and `dvc exp show`
    read."""
    flat = {}
    for arm, values in summary.items():
        flat[arm] = {"seeds": values["seeds"]}
        for key in ("train_score", "heldout_score", "win_rate_heldout", "ssr_rate"):
            if values[key] is not None:
                flat[arm][key], flat[arm][f"{key}_ci"] = values[key]
    return flat


def results_table(summary: dict) -> str:
    def cell(value) -> str:
        return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"

    lines = [
        "| arm | seeds | train score | held-out score | colour (held-out) | position (held-out) | shape (held-out) "
        "| win rate vs base (held-out) | mean SSR rate | paper PickScore |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, values in summary.items():
        lines.append(
            f"| {arm} | {values['seeds']} | {cell(values['train_score'])} | {cell(values['heldout_score'])} "
            f"| {cell(values['heldout_color'])} | {cell(values['heldout_position'])} "
            f"| {cell(values['heldout_shape'])} | {cell(values['win_rate_heldout'])} | {cell(values['ssr_rate'])} "
            f"| {PAPER_PICKSCORE.get(arm, '–')} |"
        )
    base = next(iter(summary.values()))
    lines.append(f"\nBase model: train {base['base_train_score'][0]:.3f}, held-out {base['base_heldout_score'][0]:.3f}. "
                 "Scores are oracle means (colour, shape, position correct); ± is the 95% t-interval over seeds.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    figure, axis = plt.subplots(figsize=(9, 4))
    for offset, split in ((-0.2, "train"), (0.2, "heldout")):
        means = [summary[a][f"{split}_score"][0] for a in arms]
        errors = [summary[a][f"{split}_score"][1] for a in arms]
        axis.bar(np.arange(len(arms)) + offset, means, 0.4, yerr=errors, capsize=3, label=f"{split} prompts")
    axis.axhline(summary[arms[0]]["base_heldout_score"][0], color="grey", linestyle="--", label="base (held-out)")
    axis.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    axis.set_ylabel("oracle score")
    axis.legend()
    figure.tight_layout()
    figure.savefig(directory / "scores.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 4))
    for arm in arms:
        points = [(row["ssr_rate"], row["heldout_score"]) for row in rows
                  if row["arm"] == arm and row["ssr_rate"] is not None]
        if points:
            axis.scatter(*zip(*points), label=arm)
    axis.set_xlabel("mean SSR rate over training")
    axis.set_ylabel("held-out oracle score")
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
    directory = run_folder(cfg.output)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2))
    (directory / "metrics.json").write_text(json.dumps(flat_metrics(summary), indent=2))
    table = results_table(summary)
    (directory / "results.md").write_text(table)
    plot(rows, summary, directory)
    if not storage.is_local(cfg.output):
        fs, remote = storage.filesystem(cfg.output)
        for name in RESULT_FILES:
            fs.put_file(str(directory / name), storage.join(remote, name))
    return {"output": cfg.output, "arms": len(cfg.arms), "seeds": len(cfg.seeds), "table": table}
