"""An evaluation's results: the one reader and writer of its metrics.json.

Report, telemetry, the pipeline's promotion gate and the experiment ask this class for scores and win rates instead
of walking the JSON. The file's layout is a public format (DVC metrics, the KFP pipeline and the README read it):

    {config, model, checkpoint, sampler, prompt_sets, [rescored_from],
     scorers: [primary, ...], splits: [prompt set, ...],
     models: {model: {split: {scorer: {mean, <attribute>..., n}}}},
     win_rate: {scorer: {split or "all": {rate, ci_low, ci_high, n, wins, ties, losses}}}   (only with a trained model)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from sspo import storage
from sspo.errors import SSPOError

METRICS_FILE = "metrics.json"
ALL = "all"  # the win rate over every prompt set's pairs together
SUMMARY_KEYS = ("mean", "n")  # every other key of a scorer's summary is a per-attribute value


@dataclass(frozen=True)
class WinRate:
    """How often the trained model beats the base model on paired images (ties count half), with a bootstrap
    interval; rate and interval are None when no pair was scored."""

    rate: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    wins: int
    ties: int
    losses: int


class Evaluation:
    """What one `sspo evaluate` measured: mean scores per model, prompt set and scorer, and win rates."""

    def __init__(self, data: dict):
        self.data = data  # the metrics.json document; provenance (sampler, prompt_sets, ...) is read from it as is

    @classmethod
    def new(cls, provenance: dict, scorers: list[str], splits: list[str], models: list[str]) -> Evaluation:
        """Results to fill with add_scores and add_win_rate; `provenance` (config, model, checkpoint, sampler,
        prompt_sets, ...) comes first in the file."""
        return cls({**provenance, "scorers": list(scorers), "splits": list(splits), "models": {m: {} for m in models}})

    @classmethod
    def read(cls, url: str) -> Evaluation:
        """The results of the evaluation folder at `url`."""
        try:
            data = storage.read_json(storage.join(url, METRICS_FILE))
        except SSPOError as err:
            raise SSPOError(f"not a finished evaluation: {url} ({err})") from None
        if not isinstance(data, dict) or not {"scorers", "splits", "models"} <= data.keys():
            raise SSPOError(f"not a finished evaluation: {url} (its {METRICS_FILE} holds no evaluation results)")
        return cls(data)

    def write(self, directory: Path) -> None:
        (Path(directory) / METRICS_FILE).write_text(json.dumps(self.data, indent=2))

    def add_scores(self, model: str, split: str, summaries: dict[str, dict]) -> None:
        """Each scorer's summary ({"mean", per-attribute values, "n"}) of `model`'s images of prompt set `split`."""
        self.data["models"][model][split] = summaries

    def add_win_rate(self, scorer: str, split: str, win_rate: WinRate) -> None:
        self.data.setdefault("win_rate", {}).setdefault(scorer, {})[split] = dataclasses.asdict(win_rate)

    @property
    def scorers(self) -> list[str]:
        return self.data["scorers"]

    @property
    def primary_scorer(self) -> str:
        """The first scorer: the one tables, the promotion gate and the experiment compare by."""
        return self.scorers[0]

    @property
    def splits(self) -> list[str]:
        return self.data["splits"]

    @property
    def models(self) -> list[str]:
        return list(self.data["models"])

    @property
    def win_rate_splits(self) -> list[str]:
        """The prompt sets with a win rate, then ALL; none when only the base model was evaluated."""
        return [*self.splits, ALL] if "win_rate" in self.data else []

    def _summary(self, model: str, split: str, scorer: str | None) -> dict:
        scorer = scorer or self.primary_scorer
        try:
            return self.data["models"][model][split][scorer]
        except KeyError:
            raise SSPOError(f"the evaluation holds no {scorer} score of model {model!r} on prompt set {split!r} "
                            f"(models: {', '.join(self.models)}; prompt sets: {', '.join(self.splits)}; "
                            f"scorers: {', '.join(self.scorers)})") from None

    def score(self, model: str, split: str, scorer: str | None = None) -> float | None:
        """Mean score (default: the primary scorer's); None where the scorer applies to none of the images."""
        return self._summary(model, split, scorer)["mean"]

    def attributes(self, model: str, split: str, scorer: str | None = None) -> dict[str, float | None]:
        """Per-attribute values (the oracle's color, shape, position); empty for a scorer that reports none."""
        return {k: v for k, v in self._summary(model, split, scorer).items() if k not in SUMMARY_KEYS}

    def win_rate(self, split: str, scorer: str | None = None) -> WinRate:
        """Trained vs base on prompt set `split` (or ALL), by `scorer` (default: the primary one)."""
        scorer = scorer or self.primary_scorer
        try:
            return WinRate(**self.data["win_rate"][scorer][split])
        except KeyError:
            held = ", ".join(self.win_rate_splits) or "none, only the base model was evaluated"
            raise SSPOError(f"the evaluation holds no {scorer} win rate on prompt set {split!r} "
                            f"(win rates on: {held}; scorers: {', '.join(self.scorers)})") from None

    def scalars(self) -> dict[str, float]:
        """Every number, named by its path: models.trained.heldout.oracle.mean, win_rate.oracle.all.rate, ..."""
        paths = {f"models.{model}.{split}.{scorer}.{key}": value
                 for model, by_split in self.data["models"].items() for split, by_scorer in by_split.items()
                 for scorer, summary in by_scorer.items() for key, value in summary.items()}
        paths |= {f"win_rate.{scorer}.{split}.{key}": value
                  for scorer, by_split in self.data.get("win_rate", {}).items() for split, rate in by_split.items()
                  for key, value in rate.items()}
        return {path: float(value) for path, value in paths.items() if value is not None}
