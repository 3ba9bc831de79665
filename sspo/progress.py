"""Progress of long work: a tqdm bar on a terminal, plain log lines (about every tenth of the work) in a pod."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True):
        self.total, self.desc, self.done = total, desc, initial
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc) if self.interactive else None
        self.every = max(1, total // 10)
        self.log = logging.getLogger("sspo.progress")

    def update(self, n: int = 1, **values) -> None:
        self.done += n
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.update(n)
            if values:
                self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            self.log.info("%s %d/%d %s", self.desc, self.done, self.total, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
