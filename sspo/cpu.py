"""How many intra-op threads a process should use. In a container with a CPU limit, torch sizes its thread pool from
the node's cores, not the container's quota: the surplus threads are throttled, and every step runs several times
slower than with one thread per CPU of the quota."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def cgroup_v2_path(self_cgroup: Path) -> str | None:
    """This process's cgroup v2 path ("0::/path" in /proc/self/cgroup), None without one."""
    if not self_cgroup.exists():
        return None
    for line in self_cgroup.read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs the process's cgroup may use (quota / period), the tightest over its ancestors; None when unlimited."""
    quotas = []
    path = cgroup_v2_path(self_cgroup)
    if path is not None:
        folder = root / path.strip("/")
        while True:
            limits = folder / "cpu.max"
            if limits.exists():
                quota, period = limits.read_text().split()[:2]
                if quota != "max":
                    quotas.append(int(quota) / int(period))
            if folder == root:
                break
            folder = folder.parent
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        quota_file, period_file = v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us"
        if quota_file.exists() and period_file.exists() and int(quota_file.read_text()) > 0:
            quotas.append(int(quota_file.read_text()) / int(period_file.read_text()))
    return min(quotas) if quotas else None


def intra_op_threads(requested: int, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int | None:
    """`requested` when set, else one thread per whole CPU of the cgroup's quota (at least one); None leaves torch's
    default (no quota)."""
    if requested:
        return requested
    quota = cpu_quota(root, self_cgroup)
    return None if quota is None else max(1, int(quota))


def configure_threads(requested: int) -> int:
    """Set torch's intra-op threads as intra_op_threads says; returns the number in use."""
    import torch

    threads = intra_op_threads(requested)
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("intra-op threads: %d (%s)", torch.get_num_threads(),
             "requested" if requested else "cgroup CPU quota" if threads else "torch default, no CPU quota")
    return torch.get_num_threads()
