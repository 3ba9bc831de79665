"""Intra-op threads follow the CPU quota of the process's cgroup (v2 and v1 layouts), or the flag."""

from pathlib import Path

from sspo.cpu import cpu_quota, intra_op_threads


def cgroup_v2(root: Path, limits: dict[str, str]) -> Path:
    """A cgroup v2 tree with cpu.max at the given paths; returns the /proc/self/cgroup file for /pod/container."""
    for path, value in limits.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "cpu.max").write_text(value + "\n")
    self_cgroup = root.parent / "self-cgroup"
    self_cgroup.write_text("0::/pod/container\n")
    return self_cgroup


def test_the_tightest_v2_limit_over_the_ancestors_counts(tmp_path):
    root = tmp_path / "cgroup"
    self_cgroup = cgroup_v2(root, {"pod": "150000 100000", "pod/container": "max 100000", ".": "max 100000"})
    assert cpu_quota(root, self_cgroup) == 1.5
    assert intra_op_threads(0, root, self_cgroup) == 1
    assert intra_op_threads(3, root, self_cgroup) == 3  # the flag wins


def test_without_a_quota_torch_keeps_its_default(tmp_path):
    root = tmp_path / "cgroup"
    self_cgroup = cgroup_v2(root, {"pod/container": "max 100000"})
    assert cpu_quota(root, self_cgroup) is None
    assert intra_op_threads(0, root, self_cgroup) is None


def test_a_v1_quota_and_a_fraction_of_a_cpu(tmp_path):
    root = tmp_path / "cgroup"
    (root / "cpu,cpuacct").mkdir(parents=True)
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("50000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(root, tmp_path / "no-such-file") == 0.5
    assert intra_op_threads(0, root, tmp_path / "no-such-file") == 1
