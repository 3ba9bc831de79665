"""Progress of long work: a tqdm bar on a terminal, plain log lines in a pod.

Off a terminal a line is logged whenever the count crosses a tenth of the total (the end included), and at least
every $SSPO_PROGRESS_SECONDS seconds (default 30) while updates come in: counts move a batch at a time, so they may
step over every exact tenth, and a tenth of a long job can take many minutes.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm.auto import tqdm

from sspo.errors import SSPOError

INTERVAL_ENV = "SSPO_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def log_interval() -> float:
    value = os.environ.get(INTERVAL_ENV, str(DEFAULT_INTERVAL))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses NaN
        raise SSPOError(f"{INTERVAL_ENV} must be a number of seconds (0 or more), not {value!r}")
    return seconds


class Progress:
    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True, stream=None):
        self.total, self.desc, self.done = total, desc, initial
        self.enabled = enabled
        stream = stream if stream is not None else sys.stderr
        self.interactive = enabled and stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=stream) if self.interactive else None
        self.interval = log_interval()
        self.logged_tenth = self.tenth(initial)
        self.logged_at = time.monotonic()
        self.log = logging.getLogger("sspo.progress")

    def tenth(self, count: int) -> int:
        return count * 10 // max(1, self.total)

    def update(self, n: int = 1, **values) -> None:
        self.done += n
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.update(n)
            if values:
                self.bar.set_postfix_str(text, refresh=False)
            return
        if not self.enabled:
            return
        now, tenth = time.monotonic(), self.tenth(self.done)
        if tenth > self.logged_tenth or now - self.logged_at >= self.interval:
            self.log.info("%s %d/%d %s", self.desc, self.done, self.total, text)
            self.logged_tenth, self.logged_at = tenth, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
