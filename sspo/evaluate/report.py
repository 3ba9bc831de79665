"""Numbers and documents from scored images: means, win rates with bootstrap intervals, grids, Markdown/HTML/CSV."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sspo.evaluate.results import Evaluation, WinRate
from sspo.toy.world import ATTRIBUTES

TILE = 96
CONFIDENCE = 0.95


def mean_or_none(values) -> float | None:
    """Mean over the images a scorer applies to (NaN marks the others); None when it applies to none."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def summarize(scored: dict[str, np.ndarray]) -> dict:
    """One scorer's per-image arrays → {"mean", "n" (images it applies to), per-attribute means (oracle)}."""
    summary = {"mean" if key == "score" else key: mean_or_none(values) for key, values in scored.items()}
    return summary | {"n": int(np.count_nonzero(~np.isnan(scored["score"])))}


def win_rate(candidate: np.ndarray, base: np.ndarray, samples: int, seed: int) -> WinRate:
    """Fraction of paired (prompt, seed) images where the candidate scores higher, ties counting half, with a
    percentile bootstrap interval over the pairs (resampling seeded, so the same inputs give the same interval)."""
    keep = ~(np.isnan(candidate) | np.isnan(base))
    outcomes = (np.sign(candidate[keep] - base[keep]) + 1) / 2
    n = len(outcomes)
    if n == 0:
        return WinRate(rate=None, ci_low=None, ci_high=None, n=0, wins=0, ties=0, losses=0)
    draws = np.random.default_rng(seed).integers(n, size=(samples, n))
    resampled = outcomes[draws].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    return WinRate(
        rate=float(outcomes.mean()),
        ci_low=float(np.percentile(resampled, tail)),
        ci_high=float(np.percentile(resampled, 100 - tail)),
        n=n,
        wins=int((outcomes == 1).sum()),
        ties=int((outcomes == 0.5).sum()),
        losses=int((outcomes == 0).sum()),
    )


def grid(rows: list[str], columns: list[str], images: np.ndarray) -> Image.Image:
    """A labelled grid: one row per prompt, one column per (model, seed); `images` is (rows, columns, H, W, 3)."""
    label_width, header = 220, 16
    canvas = Image.new("RGB", (label_width + TILE * len(columns), header + TILE * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((label_width + c * TILE + 2, 2), name, fill="black")
    for r, prompt in enumerate(rows):
        draw.text((4, header + r * TILE + TILE // 2 - 5), prompt[:36], fill="black")
        for c in range(len(columns)):
            image = Image.fromarray(images[r, c])
            resample = Image.NEAREST if image.width <= TILE else Image.LANCZOS
            canvas.paste(image.resize((TILE, TILE), resample), (label_width + c * TILE, header + r * TILE))
    return canvas


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _interval(win_rate: WinRate) -> str:
    if win_rate.rate is None:
        return "–"
    return f"{win_rate.rate:.3f} [{win_rate.ci_low:.3f}, {win_rate.ci_high:.3f}] (n={win_rate.n})"


def table(results: Evaluation) -> str:
    """Markdown table of the first scorer's mean per model and prompt set, and the win rate (the demo prints it)."""
    splits = results.splits
    labels = {"train": "train prompts", "heldout": "held-out prompts"}
    lines = ["| model | " + " | ".join(labels.get(s, s) for s in splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for model in results.models:
        lines.append(f"| {model} | " + " | ".join(_number(results.score(model, s)) for s in splits) + " |")
    if results.win_rate_splits:
        lines.append("| win rate trained vs base | " + " | ".join(_number(results.win_rate(s).rate) for s in splits)
                     + " |")
    return "\n".join(lines) + "\n"


def _score_tables(results: Evaluation) -> list[tuple]:
    blocks = []
    for scorer in results.scorers:
        rows = [[model, *(_number(results.score(model, s, scorer)) for s in results.splits)]
                for model in results.models]
        blocks += [("h3", scorer), ("table", ["model", *results.splits], rows)]
    return blocks


def _win_rate_table(results: Evaluation) -> tuple:
    columns = results.win_rate_splits
    rows = [[scorer, *(_interval(results.win_rate(s, scorer)) for s in columns)] for scorer in results.scorers]
    return ("table", ["scorer", *columns], rows)


def _attribute_table(results: Evaluation) -> tuple:
    # the oracle's attributes as recorded: position for images, direction for clips
    recorded = dict.fromkeys(attribute for model in results.models for s in results.splits
                             for attribute in results.attributes(model, s, "oracle"))
    rows = [[model, attribute, *(_number(results.attributes(model, s, "oracle").get(attribute))
                                 for s in results.splits)]
            for model in results.models for attribute in (recorded or ATTRIBUTES)]
    return ("table", ["model", "attribute", *results.splits], rows)


def sections(results: Evaluation) -> list[tuple]:
    """The report as blocks (heading, paragraph, list, table, grid image) that markdown() and html_report() render."""
    metrics = results.data  # provenance, shown as recorded
    sampler = metrics["sampler"]
    prompt_sets = ", ".join(f"{name} ({info['prompts']} prompts)" for name, info in metrics["prompt_sets"].items())
    blocks = [
        ("h1", "Evaluation"),
        ("list", [
            f"base model: {metrics['model']}",
            f"candidate checkpoint: {metrics['checkpoint'] or '(none: base only)'}",
            f"sampler: {sampler['scheduler']}, {sampler['steps']} steps, guidance {sampler['guidance']}, "
            f"seeds {sampler['seeds']} (the same initial noise for both models)",
            f"prompt sets: {prompt_sets}",
            *([f"images re-scored from: {metrics['rescored_from']}"] if metrics.get("rescored_from") else []),
        ]),
        ("h2", "Mean score"),
        *_score_tables(results),
    ]
    if results.win_rate_splits:
        blocks += [
            ("h2", "Win rate of the candidate over the base"),
            ("p", f"Per (prompt, seed) pair, ties count half; {CONFIDENCE:.0%} bootstrap interval over pairs "
                  f"({metrics['config']['bootstrap_samples']} resamples, seed {metrics['config']['bootstrap_seed']})."),
            _win_rate_table(results),
        ]
    if "oracle" in results.scorers:
        blocks += [("h2", "Toy-world attribute accuracy (oracle)"), _attribute_table(results)]
    blocks += [("h2", "Images"), *(("image", split) for split in results.splits)]
    return blocks


def markdown(results: Evaluation) -> str:
    lines = []
    for kind, *payload in sections(results):
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + payload[0], ""]
        elif kind == "p":
            lines += [payload[0], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in payload[0]] + [""]
        elif kind == "table":
            header, rows = payload
            lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        else:
            lines += [f"![grid {payload[0]}](grid-{payload[0]}.png)", ""]
    return "\n".join(lines)


def html_report(results: Evaluation, directory: Path) -> str:
    """The same report as one self-contained HTML page, the grids embedded as base64 PNGs."""
    parts = []
    for kind, *payload in sections(results):
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{html.escape(payload[0])}</{kind}>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in payload[0]) + "</ul>")
        elif kind == "table":
            header, rows = payload
            cells = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
            cells += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("<table>" + "".join(cells) + "</table>")
        else:
            data = base64.b64encode((directory / f"grid-{payload[0]}.png").read_bytes()).decode()
            parts.append(f'<h3>{html.escape(payload[0])}</h3><img alt="grid {html.escape(payload[0])}" '
                         f'src="data:image/png;base64,{data}">')
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px}"
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Evaluation</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_plots(directory: Path, rows: list[dict], scorer_names: list[str]) -> None:
    """DVC plots data: plots/<model>.csv with one row per image, one column per scorer."""
    (directory / "plots").mkdir(exist_ok=True)
    for model in dict.fromkeys(row["model"] for row in rows):
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image", "split", "prompt", "seed", *scorer_names])
        for number, row in enumerate(r for r in rows if r["model"] == model):
            scores = [row["scores"][s]["score"] for s in scorer_names]
            writer.writerow([number, row["split"], row["prompt"], row["seed"],
                             *("" if v is None else f"{v:.6g}" for v in scores)])
        (directory / "plots" / f"{model}.csv").write_text(buffer.getvalue())
