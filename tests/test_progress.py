import io
import logging
import time

import pytest

from sspo.errors import SSPOError
from sspo.progress import INTERVAL_ENV, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def logged(caplog) -> list[str]:
    lines = [record.getMessage().strip() for record in caplog.records if record.name == "sspo.progress"]
    caplog.clear()
    return lines


def test_off_a_terminal_every_tenth_crossed_is_logged_though_counts_skip_them(caplog, monkeypatch):
    """10,000 prompts x 4 seeds in batches of 64: no count is a multiple of 4,000, so the old rule logged nothing
    but the end."""
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    total, batch = 40_000, 64
    progress = Progress(total, "evaluate", stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="sspo.progress"):
        for start in range(0, total, batch):
            progress.update(min(batch, total - start), loss=0.5)
    progress.close()

    lines = logged(caplog)
    assert len(lines) == 10
    assert lines[0] == "evaluate 4032/40000 loss=0.5" and lines[-1] == "evaluate 40000/40000 loss=0.5"


def test_off_a_terminal_a_line_comes_at_least_every_interval(caplog, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "1")
    progress = Progress(1000, "train", initial=500, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="sspo.progress"):
        progress.update()
        assert logged(caplog) == []  # no tenth crossed, the interval not over
        time.sleep(1.1)
        progress.update()
        assert logged(caplog) == ["train 502/1000"]
        progress.update()
        assert logged(caplog) == []  # the interval starts again at each line


def test_on_a_terminal_a_bar_and_no_log_lines(caplog):
    terminal = Terminal()
    progress = Progress(10, "bootstrap", stream=terminal)
    with caplog.at_level(logging.INFO, logger="sspo.progress"):
        for _ in range(10):
            progress.update()
    progress.close()
    assert logged(caplog) == []
    assert "bootstrap: 100%" in terminal.getvalue()


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(SSPOError, match=f"{INTERVAL_ENV} must be a number of seconds"):
        Progress(10, "prepare", stream=io.StringIO())
