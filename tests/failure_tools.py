"""Checks for how a stage fails: one line on stderr, exit code 2, nothing published; and a really full disk.

The full disk is a small tmpfs mounted in a private mount namespace (`unshare --mount`): writes fail with ENOSPC
exactly as on a full volume, and the mount disappears with the command, whatever happens to the test. An
RLIMIT_FSIZE limit would need no privileges, but it is not a full disk: it fails with EFBIG, and only a file that
grows past the limit, while any number of smaller files still fit. Mounting needs root (CAP_SYS_ADMIN), which CI
runs as.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

# mount, run the command, then list what it left on the tmpfs (the mount is gone once the shell exits)
FULL_DISK_SCRIPT = """
mount -t tmpfs -o size="$1" tmpfs "$2" || { echo "cannot mount a tmpfs on $2" >&2; exit 99; }
mount_point=$2 listing=$3
shift 3
"$@"
code=$?
find "$mount_point" -mindepth 1 > "$listing"
exit $code
"""


# The only other lines allowed next to the error: the CLI's log records, and tqdm bars (transformers draws one
# when it loads weights, even off a terminal; their carriage returns may have been read as line ends).
OTHER_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) |\r|.*\d+%\|.*\| *\d+/\d+ \[|$")


def assert_one_line_error(stderr: str, stage: str, *fragments: str) -> None:
    """stderr ends in exactly one `sspo STAGE: error: ...` line holding each fragment; any other line is a log
    record or a progress bar, so no traceback and no stray warning."""
    lines = stderr.strip("\n").split("\n")
    assert lines[-1].startswith(f"sspo {stage}: error: "), stderr
    assert all(OTHER_LINE.match(line) for line in lines[:-1]), stderr
    for fragment in fragments:
        assert fragment in lines[-1], stderr


def assert_nothing_published(output: Path) -> None:
    """Neither the output nor a staging folder beside it exists."""
    assert not output.exists()
    assert not list(output.parent.glob(".sspo-staging-*"))


def sspo_on_full_disk(mount_point: Path, size: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python -m sspo ARGS` with a tmpfs of `size` (e.g. "64k") on `mount_point`; (the result, what it left there)."""
    mount_point.mkdir()
    listing = mount_point.with_name(mount_point.name + ".listing")
    command = [sys.executable, "-m", "sspo", *args]
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", FULL_DISK_SCRIPT, "sh",
                             size, str(mount_point), str(listing), *command],
                            capture_output=True, text=True, cwd="/", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 99, result.stderr
    return result, listing.read_text().splitlines()
