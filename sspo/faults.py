"""Named fault points, so that fault tests hit a crash window deterministically instead of racing a timer.

The code calls `point(name)` where a crash would leave interesting state behind. Nothing happens unless the
environment variable SSPO_FAULT names that point: `SSPO_FAULT=publish-file-uploaded:3` SIGKILLs the process the
3rd time it passes there (`:1` may be left out). `SSPO_FAULT=nan-loss:<step>` instead turns the loss of that
optimizer step (numbered as in train_log.jsonl) into NaN. The variable is read once, at the first call; unset, a
call costs a cached lookup.
"""

from __future__ import annotations

import functools
import os
import signal
from collections import Counter

from sspo.errors import SSPOError

ENV = "SSPO_FAULT"
NAN_LOSS = "nan-loss"
# Where each point is: the crash windows of a training run, in the order a checkpointing step passes them.
KILL_POINTS = {
    "train-step-done": "trainer: after a step's optimizer update, before the step is logged",
    "train-step-logged": "trainer: after the step's row is appended to train_log.jsonl",
    "checkpoint-weights-written": "checkpoint: between the weights file and the optimizer file",
    "checkpoint-written": "checkpoint publisher: checkpoint files staged, nothing published",
    "run-files-synced": "run store: run files (config, log) synced, checkpoint not yet published",
    "publish-file-uploaded": "storage.publish_dir: after each uploaded file (remote outputs only)",
    "publish-manifest-next": "storage.publish_dir: every file in place, manifest not yet written",
    "checkpoint-published": "run store: checkpoint manifest written (a remote run's staging not yet removed)",
}

_passes: Counter[str] = Counter()


@functools.cache
def _armed() -> tuple[str, int] | None:
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    count = count or "1"
    if (name not in KILL_POINTS and name != NAN_LOSS) or not count.isdigit() or int(count) < 1:
        raise SSPOError(f"{ENV}={spec!r}: expected <point>[:<n>] or {NAN_LOSS}:<step>; points: "
                        + ", ".join(KILL_POINTS))
    return name, int(count)


def point(name: str) -> None:
    """SIGKILL this process if SSPO_FAULT names this point and this is the pass it counts to."""
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _passes[name] += 1
    if _passes[name] == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def loss_at_step(loss, step: int):
    """`loss`, or NaN of the same type when SSPO_FAULT is nan-loss:<step>."""
    return loss * float("nan") if _armed() == (NAN_LOSS, step) else loss
