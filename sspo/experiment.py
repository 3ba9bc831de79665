"""`sspo experiment`: the paper's comparison, every arm trained from the same base, data, budget and seeds.

Arms: sft, dpo (paired data), spin, sspo (uniform replay, sign SSR) and its ablations (replay initial / latest,
SSR off / indicator / sft). Each (arm, seed) trains into `<output>/runs/<arm>-seed<k>` and is evaluated into
`<output>/eval/<arm>-seed<k>` (its checkpoints at `eval_at_steps` into `...-step<N>`); finished pieces are skipped,
so an interrupted experiment resumes where it stopped (a half-trained run resumes from its latest checkpoint).
A finished cell writes `<output>/records/<cell>.json`: its settings and scores, all the report reads. Records are
small enough for git, so a grid split over several machines or days is tabulated without its checkpoints and
images; a cell with a record is not run again, and a record made with other settings is refused.
`phase` splits the work in two (run the cells, tabulate them) so that a DVC pipeline can track every cell as its
own stage.

Fair settings: with `sweep_beta` / `sweep_learning_rate` every arm runs each combination (labelled e.g.
`sspo-beta400-lr0.0002`) and the report writes `chosen.json`, each arm's best by the first prompt set (a validation
split); an experiment with `tuned` set to that file trains each arm with its chosen settings. With two or more
seeds and an sft arm the report adds paired comparisons against sft (same seeds).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sspo import config, run_store, storage
from sspo.config import ExperimentConfig
from sspo.errors import SSPOError
from sspo.evaluate import prompts as prompt_sets
from sspo.evaluate.evaluate import evaluate
from sspo.evaluate.results import Evaluation
from sspo.toy import video_world
from sspo.toy.world import ATTRIBUTES
from sspo.train.trainer import RESUMABLE_SETTINGS, train

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
    # SSR as the paper's final abstract words it: the DPO loss turns into SFT on the winner when s = -1
    "sspo-ssr-sft": {"objective": "sspo", "replay": "uniform", "ssr": "sft"},
    # The paper's self-sampler (DDIM, 10 steps) against the default (DPM-Solver++, 4 steps): same loss, 2.5x the cost.
    "sspo-paper-sampler": {"objective": "sspo", "replay": "uniform", "ssr": "sign", "sampler": "ddim",
                           "sample_steps": 10},
}
PAPER_PICKSCORE = {
    "sft": 21.32, "spin": 21.55, "sspo": 21.57, "sspo-replay-initial": 21.41, "sspo-replay-latest": 21.34,
    "sspo-ssr-off": 20.88, "sspo-ssr-indicator": 21.56,
}
SWEPT = ("beta", "learning_rate")  # the train settings a sweep varies
SHORT_NAMES = {"beta": "beta", "learning_rate": "lr"}
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


@dataclass
class Cell:
    """One training run of the grid: an arm (or one of its sweep variants, `label`) with a seed and the train
    settings that differ from the arm's (a sweep variant's, or the ones a sweep chose)."""

    arm: str
    label: str
    seed: int
    settings: dict

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


def sweep_variants(cfg: ExperimentConfig, arm: str) -> list[dict]:
    """The settings an arm runs with in a sweep (one empty dict without a sweep); sft has no beta to sweep."""
    grid = {"beta": [] if ARMS[arm]["objective"] == "sft" else cfg.sweep_beta,
            "learning_rate": cfg.sweep_learning_rate}
    keys = [key for key, values in grid.items() if values]
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]


def variant_label(arm: str, settings: dict) -> str:
    return arm + "".join(f"-{SHORT_NAMES[key]}{value:g}" for key, value in settings.items())


def read_tuned(url: str, arms: list[str]) -> dict[str, dict]:
    """Each arm's chosen settings from a sweep's chosen.json."""
    try:
        chosen = storage.read_json(url)["arms"]
    except FileNotFoundError:
        raise SSPOError(f"tuned settings not found: {url} (run the sweep and its report first)") from None
    missing = [arm for arm in arms if arm not in chosen]
    if missing:
        raise SSPOError(f"{url} chose no settings for {', '.join(missing)}: its sweep did not run those arms")
    return {arm: {key: chosen[arm][key] for key in SWEPT if key in chosen[arm]} for arm in arms}


def grid_cells(cfg: ExperimentConfig) -> list[Cell]:
    tuned = read_tuned(cfg.tuned, cfg.arms) if cfg.tuned else {}
    return [Cell(arm, variant_label(arm, variant), seed, {**tuned.get(arm, {}), **variant})
            for arm in cfg.arms for variant in sweep_variants(cfg, arm) for seed in cfg.seeds]


def evaluated_steps(cfg: ExperimentConfig) -> list[int]:
    return sorted({*cfg.eval_at_steps, cfg.steps})


def cell_urls(cfg: ExperimentConfig, cell: Cell, step: int | None = None) -> tuple[str, str]:
    """Where a cell trains and where its checkpoint at `step` is evaluated (the last step: `eval/<name>`)."""
    suffix = "" if step in (None, cfg.steps) else f"-step{step}"
    return (storage.join(cfg.output, "runs", cell.name),
            storage.join(cfg.output, "eval", cell.name + suffix))


def record_url(cfg: ExperimentConfig, cell: Cell) -> str:
    return storage.join(cfg.output, "records", cell.name + ".json")


def is_finished(cfg: ExperimentConfig, cell: Cell) -> bool:
    return storage.exists(record_url(cfg, cell))


def cell_configs(cfg: ExperimentConfig, cell: Cell) -> tuple[config.TrainConfig, dict[int, config.EvaluateConfig]]:
    """The cell's train config and the evaluate config of each evaluated step."""
    run_url = cell_urls(cfg, cell)[0]
    train_cfg = config.load("train", cfg.shared_params or None, {
        **ARMS[cell.arm], **cell.settings, "model": cfg.model, "data": cfg.data, "data_split": cfg.data_split,
        "output": run_url, "seed": cell.seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
    })
    evaluate_cfgs = {step: config.load("evaluate", cfg.shared_params or None, {
        "model": cfg.model, "output": cell_urls(cfg, cell, step)[1], "seeds": cfg.eval_seeds,
        "sample_steps": cfg.eval_sample_steps, "scorers": cfg.scorers, "prompts": cfg.prompts,
        "checkpoint": run_url if step == cfg.steps else run_store.RunStore(run_url).checkpoint_url(step),
    }) for step in evaluated_steps(cfg)}
    return train_cfg, evaluate_cfgs


def cell_settings(cfg: ExperimentConfig, cell: Cell) -> dict:
    """What a record must match: the train settings that change the result, and every evaluate setting."""
    train_cfg, evaluate_cfgs = cell_configs(cfg, cell)
    train_settings = json.loads(config.to_json(train_cfg))
    return {"train": {key: value for key, value in train_settings.items() if key not in RESUMABLE_SETTINGS},
            "evaluate": {str(step): json.loads(config.to_json(c)) for step, c in evaluate_cfgs.items()}}


def dotted_settings(settings: dict) -> dict:
    """A record's settings by dotted name: `train.beta`, `evaluate.<step>.seeds`."""
    evaluate_steps = settings.get("evaluate", {})
    return {**{f"train.{key}": value for key, value in settings.get("train", {}).items()},
            **{f"evaluate.{step}.{key}": value for step, section in evaluate_steps.items()
               for key, value in section.items()}}


def read_record(cfg: ExperimentConfig, cell: Cell) -> list[dict]:
    """A finished cell's measured rows, one per evaluated step; refused when recorded with other settings."""
    url = record_url(cfg, cell)
    record = storage.read_json(url)
    recorded, expected = dotted_settings(record), dotted_settings(cell_settings(cfg, cell))
    changed = [key for key in sorted(set(recorded) | set(expected)) if recorded.get(key) != expected.get(key)]
    if changed:
        raise SSPOError(f"{url} was recorded with other settings ({', '.join(changed)}): delete it, with the cell's "
                        "runs/ and eval/ folders, to run the cell again")
    return record["rows"]


def run_cell(cfg: ExperimentConfig, cell: Cell) -> None:
    """Train and evaluate one cell, skipping what is already published, then record it."""
    if is_finished(cfg, cell):
        read_record(cfg, cell)
        return
    train_cfg, evaluate_cfgs = cell_configs(cfg, cell)
    if not run_store.is_finished(train_cfg.output):
        train(train_cfg)
    for step, evaluate_cfg in evaluate_cfgs.items():
        if storage.is_published(evaluate_cfg.output):
            continue
        if step != cfg.steps and not storage.is_published(evaluate_cfg.checkpoint):
            raise SSPOError(f"{train_cfg.output} has no checkpoint at step {step}: eval_at_steps must be multiples "
                            f"of train.save_every ({train_cfg.save_every})")
        evaluate(evaluate_cfg)
    rows = [measure(cfg, cell, step) for step in evaluate_cfgs]
    storage.write_text(record_url(cfg, cell), json.dumps({**cell_settings(cfg, cell), "rows": rows}, indent=2))


def measure(cfg: ExperimentConfig, cell: Cell, step: int) -> dict:
    """One finished cell's scores, win rates and mean SSR rate at one evaluated step."""
    run_url, eval_url = cell_urls(cfg, cell, step)
    results = Evaluation.read(eval_url)
    ssr = [row["ssr_rate"] for row in run_store.read_log(run_url) if "ssr_rate" in row and row["step"] <= step]
    scorer, splits = compared_on(cfg)
    return {
        "arm": cell.label, "seed": cell.seed, "step": step,
        **{f"{split}_score": results.score("trained", split, scorer) for split in splits},
        **{f"{split}_{key}": value for split in splits
           for key, value in results.attributes("trained", split, scorer).items()},
        **{f"base_{split}_score": results.score("base", split, scorer) for split in splits},
        **{f"win_rate_{split}": results.win_rate(split, scorer).rate for split in splits},
        "ssr_rate": float(np.mean(ssr)) if ssr else None,
    }


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("arm", "seed", "step", "ssr_rate")]
    summary = {}
    for arm in dict.fromkeys(row["arm"] for row in rows):
        arm_rows = [row for row in rows if row["arm"] == arm]
        summary[arm] = {key: confidence_interval([row[key] for row in arm_rows]) for key in keys}
        rates = [row["ssr_rate"] for row in arm_rows if row["ssr_rate"] is not None]
        summary[arm]["ssr_rate"] = confidence_interval(rates) if rates else None
        summary[arm]["seeds"] = len(arm_rows)
    return summary


def paired_against(rows: list[dict], reference: str, splits: list[str]) -> dict:
    """Per arm and prompt set, the mean of (arm − reference) over the seeds both ran, with its 95% t-interval: a
    paired two-sided t-test at 5% finds a difference when the interval excludes 0."""
    by_seed = {row["seed"]: row for row in rows if row["arm"] == reference}
    paired = {}
    for arm in dict.fromkeys(row["arm"] for row in rows if row["arm"] != reference):
        matched = [(row, by_seed[row["seed"]]) for row in rows if row["arm"] == arm and row["seed"] in by_seed]
        if len(matched) >= 2:
            paired[arm] = {split: [*confidence_interval([a[f"{split}_score"] - b[f"{split}_score"]
                                                         for a, b in matched]), len(matched)]
                           for split in splits}
    return paired


def paired_table(paired: dict, reference: str, splits: list[str]) -> str:
    if not paired:
        return ""
    columns = ["arm", "seeds", *(f"{label(s)}: arm − {reference}" for s in splits)]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for arm, values in paired.items():
        cells = [f"{mean:+.3f} ± {half:.3f}{' *' if abs(mean) > half else ''}"
                 for mean, half, _ in (values[s] for s in splits)]
        lines.append("| " + " | ".join([arm, str(next(iter(values.values()))[2]), *cells]) + " |")
    lines.append("\nPaired by seed (same seed, same data order and noise): mean difference ± 95% t-interval; "
                 "* marks a difference a two-sided paired t-test finds at the 5% level (the interval excludes 0).")
    return "\n".join(lines) + "\n"


def choose_settings(cfg: ExperimentConfig, cells: list[Cell], summary: dict, split: str) -> dict:
    """Per arm, the sweep variant with the best mean score on `split` (the first listed wins a tie). Scores are
    compared to 9 decimals: means of the same image scores summed in another order differ in the last bits."""
    chosen = {}
    for arm in cfg.arms:
        variants = list({cell.label: cell for cell in cells if cell.arm == arm}.values())
        best = max(variants, key=lambda cell: round(summary[cell.label][f"{split}_score"][0], 9))
        chosen[arm] = {**best.settings, "variant": best.label, "score": summary[best.label][f"{split}_score"][0]}
    scorer = compared_on(cfg)[0]
    return {"sweep": cfg.output, "chosen_by": f"mean {scorer} score on the {split} prompts", "arms": chosen}


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
    # only the toy worlds' attributes are ever reported, and only by a scorer that knows them (the oracles)
    attributes = [a for a in dict.fromkeys((*ATTRIBUTES, *video_world.ATTRIBUTES)) if f"{detailed}_{a}" in base]
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


def plot_over_steps(rows: list[dict], directory: Path, scorer: str, splits: list[str]) -> None:
    """Mean score per arm over the evaluated steps (step 0: the base), train and held-out, and their gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, last = splits[0], splits[-1]
    figure, (scores, gaps) = plt.subplots(1, 2, figsize=(11, 4))
    for index, arm in enumerate(dict.fromkeys(row["arm"] for row in rows)):
        arm_rows = [row for row in rows if row["arm"] == arm]
        steps = sorted({row["step"] for row in arm_rows})
        colour = f"C{index}"
        for split, style in ((last, "-"), (first, "--")):
            base = float(np.mean([row[f"base_{split}_score"] for row in arm_rows]))
            means = [base, *(np.mean([row[f"{split}_score"] for row in arm_rows if row["step"] == step])
                             for step in steps)]
            scores.plot([0, *steps], means, style, color=colour, marker="o",
                        label=f"{arm} ({label(split)})" if split == last else None)
        if first != last:
            gap = [np.mean([row[f"{first}_score"] - row[f"{last}_score"] for row in arm_rows if row["step"] == step])
                   for step in steps]
            gaps.plot(steps, gap, color=colour, marker="o", label=arm)
    scores.set_xlabel("optimizer step (0: base)")
    scores.set_ylabel(f"{scorer} score ({label(last)} solid, {label(first)} dashed)")
    scores.legend(fontsize=7)
    gaps.axhline(0, color="grey", linewidth=0.5)
    gaps.set_xlabel("optimizer step")
    gaps.set_ylabel(f"{label(first)} − {label(last)} score")
    figure.tight_layout()
    figure.savefig(directory / "score_over_steps.png", dpi=120)
    plt.close(figure)


def run_experiment(cfg: ExperimentConfig) -> dict:
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise SSPOError(f"invalid config: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    cells = grid_cells(cfg)
    if cfg.phase != "report":
        for index, cell in enumerate(cells, 1):
            log.info("experiment: %s seed %d (%d/%d)", cell.label, cell.seed, index, len(cells))
            run_cell(cfg, cell)
    if cfg.phase == "cells":
        return {"output": cfg.output, "arms": len(cfg.arms), "seeds": len(cfg.seeds)}
    missing = [cell.name for cell in cells if not is_finished(cfg, cell)]
    if missing:
        raise SSPOError(f"experiment cells not finished under {cfg.output}: {', '.join(missing)}; "
                        "run them first (--phase cells or all)")
    scorer, splits = compared_on(cfg)
    records = [read_record(cfg, cell) for cell in cells]
    rows = {step: [row for record in records for row in record if row["step"] == step]
            for step in evaluated_steps(cfg)}
    summaries = {step: summarize(step_rows) for step, step_rows in rows.items()}
    summary = summaries[cfg.steps]
    paired = {step: paired_against(step_rows, "sft", splits) for step, step_rows in rows.items()}
    tables = {step: "\n".join(filter(None, (results_table(summaries[step], scorer, splits),
                                             paired_table(paired[step], "sft", splits))))
              for step in rows}
    table = tables[cfg.steps] if len(tables) == 1 else "\n".join(
        f"### After {step} steps\n\n{tables[step]}" for step in sorted(tables))
    sweeping = cfg.sweep_beta or cfg.sweep_learning_rate
    with storage.output_folder(cfg.output) as directory:
        (directory / "results.json").write_text(json.dumps({
            "runs": [row for step in sorted(rows) for row in rows[step]], "summary": summary,
            **({"summary_at_steps": summaries} if cfg.eval_at_steps else {}),
            **({"paired_vs_sft": paired} if any(paired.values()) else {}),
            **({"tuned": read_tuned(cfg.tuned, cfg.arms), "tuned_from": cfg.tuned} if cfg.tuned else {}),
        }, indent=2))
        (directory / "metrics.json").write_text(json.dumps(flat_metrics(summary, splits), indent=2))
        if sweeping:
            chosen = choose_settings(cfg, cells, summary, splits[0])
            (directory / "chosen.json").write_text(json.dumps(chosen, indent=2))
            table += "\nChosen by " + chosen["chosen_by"] + ": " + ", ".join(
                f"{arm} → {values['variant']}" for arm, values in chosen["arms"].items()) + "\n"
        (directory / "results.md").write_text(table)
        plot(rows[cfg.steps], summary, directory, scorer, splits)
        if cfg.eval_at_steps:
            plot_over_steps([row for step_rows in rows.values() for row in step_rows], directory, scorer, splits)
    return {"output": cfg.output, "arms": len(cfg.arms), "seeds": len(cfg.seeds), "table": table}
