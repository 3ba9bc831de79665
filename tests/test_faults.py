"""The fault hook, and a representative subset of the fault campaign (`make faults` runs all of it,
bench/faults.py): kill -9 at fault points then resume, a faulty S3 server under each storage operation, generated
bad inputs, a NaN loss and a corrupt replay pool entry."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import faults as campaign  # noqa: E402

PASSES = "from sspo import faults\nfor i in range(4):\n    faults.point('train-step-done')\n    print(i, flush=True)"


def python_with_fault(code: str, fault: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "SSPO_FAULT": fault})


def test_a_fault_point_kills_the_process_on_the_pass_it_names():
    result = python_with_fault(PASSES, "train-step-done:3")
    assert result.returncode == -signal.SIGKILL and result.stdout.split() == ["0", "1"]
    assert python_with_fault(PASSES, "checkpoint-written").stdout.split() == ["0", "1", "2", "3"]  # another point


def test_a_malformed_fault_is_refused_naming_the_points():
    result = python_with_fault(PASSES, "train-step-don:1")
    assert result.returncode == 1 and "expected <point>[:<n>]" in result.stderr and "train-step-done" in result.stderr


@pytest.fixture(scope="module")
def lab(base_model, prepared, s3, tmp_path_factory):
    """The campaign's lab on the session's toy model and S3 server, with its uninterrupted reference run."""
    from s3fs import S3FileSystem

    lab = campaign.Lab(tmp_path_factory.mktemp("faults"), base_model, prepared, s3)
    handler = campaign.capture_logs_per_case()
    with lab.environment():
        S3FileSystem.clear_instance_cache()  # instances made earlier talk to the server directly, not the proxy
        lab.make_straight_run()
        yield lab
        S3FileSystem.clear_instance_cache()
    logging.getLogger().removeHandler(handler)
    lab.proxy.stop()


def passes(action, *args):
    """Run one campaign case; its failure, with the command's input and output, fails the test."""
    try:
        return action(*args)
    except campaign.CaseFailed as failed:
        pytest.fail(f"{failed.why}\n{failed.detail}", pytrace=False)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["train-step-done:3", "publish-manifest-next:1", "publish-file-uploaded:1",
                                   "checkpoint-published:1"])
def test_a_run_killed_at_a_fault_point_resumes_bit_identical(lab, fault):
    kill = next(k for k in campaign.KILLS if k.fault == fault and not k.torn_log)
    assert passes(campaign.kill_and_resume, lab, kill) == "resumed bit-identical, each step logged once"


@pytest.mark.slow
@pytest.mark.parametrize("operation, fault", [("Register", "5xx answers"), ("TrainPublish", "connection resets"),
                                              ("Pull", "download cut mid-body"), ("Replay", "stopped 0.8 s")])
def test_storage_faults_are_retried_without_partial_versions_or_corrupt_cache(lab, operation, fault):
    operation = getattr(campaign, operation)(lab)
    template = dict(campaign.PUT_FAULTS if operation.method == "PUT" else campaign.GET_FAULTS)[fault]
    assert passes(operation.attempt, template, False).startswith("retried, succeeded")


@pytest.mark.slow
def test_an_outage_longer_than_the_retries_fails_in_one_line_and_publishes_nothing(lab):
    outcome = passes(campaign.Register(lab).attempt, campaign.Fault("stop", "PUT"), True)
    assert outcome == "gave up in one line, nothing partial visible, the rerun succeeded"


@pytest.mark.slow
def test_generated_bad_inputs_fail_in_one_line_or_are_converted(lab):
    results = []
    campaign.part_bad_inputs(lab, results, total=100, seed=1)
    assert len(results) >= 100
    failed = [f"{case.part} / {case.name}: {case.failure}\n{case.detail}" for case in results if case.failure]
    if failed:
        pytest.fail(f"{len(failed)} of {len(results)} bad inputs mishandled:\n" + "\n".join(failed), pytrace=False)


@pytest.mark.slow
def test_a_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(lab):
    assert passes(campaign.nan_stop, lab, "local", 3, 2).startswith("stopped in one line, exit 2")


@pytest.mark.slow
def test_a_corrupt_replay_pool_entry_is_refused(lab):
    assert passes(campaign.refused_pool_entry, lab, "local checkpoint") == "refused in one line, exit 2"
