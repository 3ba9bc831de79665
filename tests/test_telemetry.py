"""Metrics end to end with the real Prometheus and Pushgateway binaries (Debian packages `prometheus`,
`prometheus-pushgateway`): a tiny training run and evaluation push, Prometheus scrapes, the values match the run."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_tools import PROMETHEUS, PROMTOOL, PUSHGATEWAY, require
from s3server import free_port

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "k8s" / "monitoring" / "alert-rules.yaml"
DASHBOARD = ROOT / "k8s" / "monitoring" / "grafana-dashboard.json"
# Unique per test session, so no series pushed by another session can answer this one's queries.
PIPELINE = f"telemetry-test-{uuid.uuid4().hex[:8]}"


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {seconds}s waiting for {what}")


@pytest.fixture(scope="module")
def monitoring(tmp_path_factory):
    for binary in (PROMETHEUS, PUSHGATEWAY):
        require(binary)
    directory = tmp_path_factory.mktemp("monitoring")
    gateway_port, prometheus_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "pushgateway", "honor_labels": True,
                            "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}]}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    processes = [
        subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{gateway_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}",
                          f"--storage.tsdb.path={directory / 'data'}",
                          f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    gateway, prometheus = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{prometheus_port}"
    try:
        for url in (gateway, prometheus):
            wait_until(lambda: get(f"{url}/-/ready"), 60, f"{url} to be ready")
        # a process that lost the race for its port exits, and "ready" came from whatever holds that port
        assert all(process.poll() is None for process in processes), "pushgateway or prometheus exited"
        yield {"gateway": gateway, "prometheus": prometheus}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def query(prometheus: str, expr: str) -> dict:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(get(url))
    except urllib.error.HTTPError as err:
        return json.loads(err.read().decode())


def value(prometheus: str, expr: str, seconds: float = 60) -> float:
    """The single value of `expr`, waiting until Prometheus has scraped it."""
    def found():
        result = query(prometheus, expr)["data"]["result"]
        return result[0]["value"][1] if len(result) == 1 else None

    return float(wait_until(found, seconds, expr))


def sspo(*args, cwd, **env_extra):
    env = {**os.environ, "SSPO_PIPELINE": PIPELINE, **env_extra}
    return subprocess.Popen([sys.executable, "-m", "sspo.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def metric_names(exposition: str) -> set[str]:
    names = set(re.findall(r"^# TYPE (\S+)", exposition, re.M))
    return names | set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exposition, re.M))


@pytest.mark.slow
def test_train_and_evaluate_metrics_reach_prometheus(monitoring, base_model, prepared, tmp_path):
    prometheus, metrics_port = monitoring["prometheus"], free_port()
    started = time.time()
    run = tmp_path / "run"
    train = sspo("train", "--model", base_model, "--data", prepared, "--output", str(run), "--steps", "2",
                 "--batch-size", "4", "--save-every", "2", "--sample-steps", "2", "--lr-warmup-steps", "1",
                 "--metrics-port", str(metrics_port), "--pushgateway", monitoring["gateway"], cwd=tmp_path)

    def endpoint() -> str | None:
        if train.poll() is not None:
            pytest.fail("training ended before its metrics endpoint answered:\n" + train.stdout.read())
        text = get(f"http://127.0.0.1:{metrics_port}/metrics")
        return text if "sspo_train_running 1.0" in text else None

    live = wait_until(endpoint, 120, "the trainer's own metrics endpoint while it runs")
    output, _ = train.communicate(timeout=600)
    assert train.returncode == 0, output
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)

    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    selector = f'{{job="sspo",stage="train",pipeline="{PIPELINE}"}}'
    assert value(prometheus, f"sspo_train_loss{selector}") == pytest.approx(log[-1]["loss"], rel=1e-6)
    for metric, key in [("sspo_train_ssr_rate", "ssr_rate"), ("sspo_train_implicit_accuracy", "implicit_acc"),
                        ("sspo_train_replay_index", "ref_index"), ("sspo_train_step", "step")]:
        assert value(prometheus, metric + selector) == pytest.approx(log[-1][key], rel=1e-6), metric
    assert value(prometheus, f"sspo_train_samples_total{selector}") == 2 * 4
    assert value(prometheus, f"sspo_train_step_seconds_count{selector}") == 2
    assert value(prometheus, f"sspo_train_step_seconds_sum{selector}") == pytest.approx(
        sum(row["seconds"] for row in log), rel=1e-6)
    assert value(prometheus, f"sspo_train_checkpoint_publish_seconds_count{selector}") == 1
    assert value(prometheus, f"sspo_train_running{selector}") == 0
    last_success = value(prometheus, f"sspo_last_success_timestamp_seconds{selector}")
    assert started < last_success < time.time()

    evaluation = tmp_path / "eval"
    checkpoint = run / "checkpoints" / "step-0000002"
    evaluate = sspo("evaluate", "--model", base_model, "--checkpoint", str(checkpoint), "--output", str(evaluation),
                    "--seeds", "0", "--sample-steps", "2", "--max-prompts", "3", "--bootstrap-samples", "50",
                    cwd=tmp_path, SSPO_PUSHGATEWAY=monitoring["gateway"])
    output, _ = evaluate.communicate(timeout=600)
    assert evaluate.returncode == 0, output
    metrics = json.loads((evaluation / "metrics.json").read_text())
    selector = f'job="sspo",stage="evaluate",pipeline="{PIPELINE}",scorer="oracle"'
    for model in ("base", "trained"):
        got = value(prometheus, f'sspo_eval_score{{{selector},model="{model}",split="heldout"}}')
        assert got == pytest.approx(metrics["models"][model]["heldout"]["oracle"]["mean"])
    rate = metrics["win_rate"]["oracle"]["all"]
    assert value(prometheus, f'sspo_eval_win_rate{{{selector},split="all"}}') == pytest.approx(rate["rate"])
    assert value(prometheus, f'sspo_eval_win_rate_ci_upper{{{selector},split="all"}}') == pytest.approx(rate["ci_high"])

    # every dashboard query names metrics the code exposes, and Prometheus accepts it
    exposed = metric_names(live) | metric_names(get(f"{monitoring['gateway']}/metrics"))
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert expressions
    for expr in expressions:
        referenced = set(re.findall(r"\bsspo_[a-z0-9_]+", expr))
        assert referenced and referenced <= exposed, f"{expr} refers to {referenced - exposed}"
        concrete = expr.replace("$pipeline", ".*").replace("$__rate_interval", "1m")
        assert query(prometheus, concrete)["status"] == "success", expr
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert set(re.findall(r"\bsspo_[a-z0-9_]+", rule["expr"])) <= exposed, rule["alert"]
    # the rules file loaded into the real Prometheus
    loaded = json.loads(get(f"{prometheus}/api/v1/rules"))["data"]["groups"]
    assert {r["name"] for g in loaded for r in g["rules"]} == {r["alert"] for r in rules}


def test_alert_rules_pass_promtool_and_fire(tmp_path):
    require(PROMTOOL)
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    labels = 'job="sspo",pipeline="p"'
    description = {r["alert"]: r["annotations"]["description"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f'sspo_train_loss{{{labels},stage="train"}}', "values": "0.5 NaN NaN NaN"},
                {"series": f'sspo_eval_win_rate_ci_upper{{{labels},stage="evaluate",scorer="oracle",split="all"}}',
                 "values": "0.45x3"},
                {"series": f'sspo_eval_win_rate_ci_upper{{{labels},stage="evaluate",scorer="oracle",split="train"}}',
                 "values": "0.45x3"},
                {"series": f'sspo_train_running{{instance="t"}}', "values": "1x30"},
                {"series": f'sspo_train_samples_total{{instance="t"}}', "values": "0+8x5 40x25"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "SSPOTrainingLossNaN", "exp_alerts": [
                    {"exp_labels": {"job": "sspo", "pipeline": "p", "stage": "train", "severity": "critical"},
                     "exp_annotations": {"summary": "SSPO training loss is NaN (pipeline p)",
                                         "description": description["SSPOTrainingLossNaN"]}}]},
                {"eval_time": "0m", "alertname": "SSPOTrainingLossNaN", "exp_alerts": []},
                {"eval_time": "1m", "alertname": "SSPOEvaluationRegression", "exp_alerts": [
                    {"exp_labels": {"job": "sspo", "pipeline": "p", "stage": "evaluate", "scorer": "oracle",
                                    "split": "all", "severity": "warning"},
                     "exp_annotations": {"summary": "SSPO candidate loses to the base on oracle (pipeline p)",
                                         "description": "Upper bound of the win rate's bootstrap interval is 0.450."}}]},
                {"eval_time": "10m", "alertname": "SSPOTrainingStalled", "exp_alerts": []},
                {"eval_time": "28m", "alertname": "SSPOTrainingStalled", "exp_alerts": [
                    {"exp_labels": {"instance": "t", "severity": "warning"},
                     "exp_annotations": {"summary": "SSPO training made no progress for 20 minutes (t)",
                                         "description": description["SSPOTrainingStalled"]}}]},
            ],
        }, {
            "interval": "1m",
            "input_series": [{"series": f'sspo_last_success_timestamp_seconds{{{labels},stage="train"}}',
                              "values": "0x3000"}],
            "alert_rule_test": [
                {"eval_time": "47h", "alertname": "SSPOLastSuccessTooOld", "exp_alerts": []},
                {"eval_time": "49h", "alertname": "SSPOLastSuccessTooOld", "exp_alerts": [
                    {"exp_labels": {"job": "sspo", "pipeline": "p", "stage": "train", "severity": "warning"},
                     "exp_annotations": {"summary": "SSPO stage train of p has not succeeded for over 2 days",
                                         "description": "Last success 2d 1h 0m 0s ago."}}]},
            ],
        }],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
