"""Prometheus metrics: served over HTTP while training runs, pushed to a Pushgateway when a stage succeeds.

Each stage owns a registry, so a push carries only that stage's metrics. The push goes to the group
{job="sspo", stage=<stage>, pipeline=<SSPO_PIPELINE or "default">} — no run id, so every run of a pipeline's stage
replaces the previous one's values and the Pushgateway does not grow. A failed stage pushes nothing: its
`sspo_last_success_timestamp_seconds` stays old, which is what the "last success too old" alert watches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import urllib.error

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, pushadd_to_gateway,
                               start_http_server)

from sspo.evaluate.results import Evaluation

log = logging.getLogger(__name__)

PUSHGATEWAY_ENV, PIPELINE_ENV = "SSPO_PUSHGATEWAY", "SSPO_PIPELINE"
JOB = "sspo"

REGISTRIES: dict[str, CollectorRegistry] = {}


def registry(stage: str) -> CollectorRegistry:
    return REGISTRIES.setdefault(stage, CollectorRegistry())


_train = registry("train")
train_running = Gauge("sspo_train_running", "1 while a training run is in progress", registry=_train)
train_step = Gauge("sspo_train_step", "Optimizer steps completed", registry=_train)
train_loss = Gauge("sspo_train_loss", "Loss of the last optimizer step", registry=_train)
train_ssr_rate = Gauge("sspo_train_ssr_rate", "Fraction of samples whose SSR sign flipped (s = -1)", registry=_train)
train_implicit_accuracy = Gauge("sspo_train_implicit_accuracy", "Fraction of pairs the implicit reward orders right",
                                registry=_train)
train_replay_index = Gauge("sspo_train_replay_index", "Replay pool index of the reference of the last step",
                           registry=_train)
train_learning_rate = Gauge("sspo_train_learning_rate", "Learning rate after the last step", registry=_train)
train_step_seconds = Histogram("sspo_train_step_seconds", "Wall time of one optimizer step", registry=_train,
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
train_samples = Counter("sspo_train_samples", "Training samples consumed (all processes)", registry=_train)
checkpoint_publish_seconds = Histogram("sspo_train_checkpoint_publish_seconds",
                                       "Wall time to write and publish one checkpoint (in the background unless "
                                       "async_checkpoint is off)", registry=_train,
                                       buckets=(0.1, 0.5, 1, 5, 15, 60, 300))
checkpoint_wait_seconds = Histogram("sspo_train_checkpoint_wait_seconds",
                                    "Time training waited for a checkpoint's write and publish (the whole of it when "
                                    "async_checkpoint is off)", registry=_train,
                                    buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 15, 60, 300))
gpu_memory_bytes = Gauge("sspo_train_gpu_memory_bytes", "CUDA memory of the training process", ["kind"],
                         registry=_train)

_evaluate = registry("evaluate")
eval_score = Gauge("sspo_eval_score", "Mean score of a model on a prompt set", ["scorer", "model", "split"],
                   registry=_evaluate)
eval_win_rate = Gauge("sspo_eval_win_rate", "Win rate of the trained model over the base", ["scorer", "split"],
                      registry=_evaluate)
eval_win_rate_low = Gauge("sspo_eval_win_rate_ci_lower", "Lower bound of the win rate's bootstrap interval",
                          ["scorer", "split"], registry=_evaluate)
eval_win_rate_high = Gauge("sspo_eval_win_rate_ci_upper", "Upper bound of the win rate's bootstrap interval",
                           ["scorer", "split"], registry=_evaluate)

LAST_SUCCESS = "sspo_last_success_timestamp_seconds"
STAT_GAUGES = {"loss": train_loss, "ssr_rate": train_ssr_rate, "implicit_acc": train_implicit_accuracy,
               "ref_index": train_replay_index, "lr": train_learning_rate}


def record_step(stats: dict, samples: int) -> None:
    """One optimizer step's statistics (the trainer's train_log.jsonl row)."""
    train_step.set(stats["step"])
    for key, gauge in STAT_GAUGES.items():
        if key in stats:
            gauge.set(stats[key])
    train_step_seconds.observe(stats["seconds"])
    train_samples.inc(samples)
    import torch  # here, not at the top: pushing a stage's metrics must not pay for importing torch

    if torch.cuda.is_available():
        gpu_memory_bytes.labels("allocated").set(torch.cuda.memory_allocated())
        gpu_memory_bytes.labels("max_allocated").set(torch.cuda.max_memory_allocated())


def record_evaluation(results: Evaluation) -> None:
    for scorer in results.scorers:
        for model in results.models:
            for split in results.splits:
                score = results.score(model, split, scorer)
                eval_score.labels(scorer, model, split).set(math.nan if score is None else score)
        for split in results.win_rate_splits:
            rate = results.win_rate(split, scorer)
            for gauge, value in ((eval_win_rate, rate.rate), (eval_win_rate_low, rate.ci_low),
                                 (eval_win_rate_high, rate.ci_high)):
                gauge.labels(scorer, split).set(math.nan if value is None else value)


@contextlib.contextmanager
def serve_training(port: int):
    """Serve the training metrics on `port` (0 = off) while the block runs; only the main process serves."""
    server = None
    if port and int(os.environ.get("RANK", "0")) == 0:
        server, _ = start_http_server(port, registry=_train)
        log.info("serving training metrics on :%d/metrics", port)
    train_running.set(1)
    try:
        yield
    finally:
        train_running.set(0)
        if server is not None:
            server.shutdown()
            server.server_close()


def push_stage(stage: str, gateway: str = "") -> bool:
    """Push the stage's metrics and its last-success time to the Pushgateway (`gateway`, else $SSPO_PUSHGATEWAY),
    replacing the group's metrics."""
    success = CollectorRegistry()
    Gauge(LAST_SUCCESS, "Unix time the stage last finished successfully", registry=success).set_to_current_time()
    return _push(push_to_gateway, stage, gateway, _Union(registry(stage), success))


def push_failure(stage: str, gateway: str = "") -> bool:
    """Push the metrics of a stage that is failing (e.g. a NaN loss, for the alert) without a last-success time:
    added to the group, so the last success pushed before stays as it was."""
    return _push(pushadd_to_gateway, stage, gateway, registry(stage))


def _push(send, stage: str, gateway: str, pushed) -> bool:
    """Monitoring must never fail the work it watches: an unreachable gateway is logged, not raised."""
    gateway = gateway or os.environ.get(PUSHGATEWAY_ENV, "")
    if not gateway or int(os.environ.get("RANK", "0")) != 0:
        return False
    grouping = {"stage": stage, "pipeline": os.environ.get(PIPELINE_ENV, "default")}
    try:
        send(gateway, job=JOB, registry=pushed, grouping_key=grouping, timeout=10)
    except (OSError, urllib.error.URLError) as err:
        log.warning("could not push %s metrics to %s: %s", stage, gateway, err)
        return False
    return True


class _Union:
    """Several registries exposed as one, for a single push (a push replaces the group's metrics)."""

    def __init__(self, *registries: CollectorRegistry):
        self.registries = registries

    def collect(self):
        for source in self.registries:
            yield from source.collect()
