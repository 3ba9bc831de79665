"""The Kubernetes manifests: schema-valid for a pinned Kubernetes version, renderable by kustomize, consistent with
the pipeline (secret, service account) and with the monitoring files they are generated from."""

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_tools import PROMTOOL, require

from sspo.pipelines import cli as pipeline_cli
from sspo.pipelines import pipeline

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.32.0"  # the oldest Kubernetes the manifests are meant for
OVERLAYS = [K8S / "base", K8S / "overlays" / "example"]
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
KUBECTL = shutil.which("kubectl")


def render(folder: Path) -> list[dict]:
    """`kubectl kustomize FOLDER` as objects (a fresh copy each call)."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render the kustomization")
    return copy.deepcopy(_render(folder))


@functools.cache
def _render(folder: Path) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict], kind: str, name_prefix: str) -> dict:
    (found,) = [obj for obj in by_kind(objects, kind) if obj["metadata"]["name"].startswith(name_prefix)]
    return found


def source_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted((K8S / "base").glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("folder", OVERLAYS, ids=lambda p: p.name)
def test_rendered_core_objects_are_valid_for_the_pinned_kubernetes(folder):
    objects = render(folder)
    expected = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap", "Deployment", "Service",
                "ServiceMonitor", "PrometheusRule"}
    if folder.name == "example":
        expected.remove("Namespace")  # a Kubeflow profile owns its namespace
    assert expected <= {obj["kind"] for obj in objects}
    for obj in objects:
        if obj["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_source_manifest_validates_on_its_own():
    for path, doc in source_documents():
        if doc["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert "namespace" not in doc["metadata"], f"{path.name}: the kustomization sets the namespace"


def test_validation_rejects_a_broken_manifest():
    deployment = one(render(K8S / "base"), "Deployment", "sspo-pushgateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_overlay_moves_everything_into_its_namespace_and_keeps_the_profile_namespace_unmanaged():
    objects = render(K8S / "overlays" / "example")
    assert not by_kind(objects, "Namespace")
    assert {obj["metadata"].get("namespace") for obj in objects} == {"kubeflow-user-example-com"}
    launcher = one(objects, "ConfigMap", "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://example-ml-artifacts/")


def test_pods_run_as_non_root_with_requests_and_limits():
    deployments = by_kind(render(K8S / "base"), "Deployment")
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            image, _, tag = container["image"].rpartition(":")
            assert image and tag and tag != "latest", container["image"]


def test_s3_secret_is_a_template_that_feeds_both_the_steps_and_the_launcher():
    objects = render(K8S / "base")
    secret = one(objects, "Secret", pipeline.S3_SECRET)
    assert set(pipeline.S3_SECRET_ENV.values()) <= set(secret["stringData"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert secret["stringData"][key].startswith("REPLACE_"), "real credentials must never be committed"
    launcher = one(objects, "ConfigMap", "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://")
    providers = yaml.safe_load(launcher["data"]["providers"])
    credentials = providers["s3"]["default"]["credentials"]
    assert credentials["fromEnv"] is False
    ref = credentials["secretRef"]
    assert ref["secretName"] == pipeline.S3_SECRET
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(secret["stringData"])


def test_pipeline_service_account_may_read_only_its_config_and_secret():
    objects = render(K8S / "base")
    account = one(objects, "ServiceAccount", pipeline_cli.DEFAULT_SERVICE_ACCOUNT)
    binding = one(objects, "RoleBinding", "sspo-pipeline")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "sspo"}]
    rules = one(objects, "Role", binding["roleRef"]["name"])["rules"]
    secret_rules = [rule for rule in rules if "secrets" in rule["resources"]]
    assert secret_rules == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [pipeline.S3_SECRET],
                             "verbs": ["get"]}]


def test_service_monitor_selects_the_pushgateway_service_port():
    objects = render(K8S / "base")
    monitor = one(objects, "ServiceMonitor", "sspo-pushgateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(objects, "Service", "sspo-pushgateway")
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels.items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"] and all(e["port"] in ports for e in monitor["spec"]["endpoints"])
    assert all(e["honorLabels"] is True for e in monitor["spec"]["endpoints"])  # keep the pushed job labels
    deployment = one(objects, "Deployment", "sspo-pushgateway")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_prometheus_rule_holds_exactly_the_alert_rules_file():
    rule = one(render(K8S / "base"), "PrometheusRule", "sspo-alerts")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = yaml.safe_load((K8S / "monitoring" / "alert-rules.yaml").read_text())["groups"]
    assert rule["spec"]["groups"] == groups
    for group in groups:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert item["expr"] and ("alert" in item) != ("record" in item)


def test_grafana_dashboard_config_map_holds_the_dashboard_file():
    config_map = one(render(K8S / "base"), "ConfigMap", "sspo-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = (K8S / "monitoring" / "grafana-dashboard.json").read_text()
    assert json.loads(config_map["data"]["grafana-dashboard.json"]) == json.loads(dashboard)


def test_generated_monitoring_copies_are_up_to_date():
    result = subprocess.run([sys.executable, str(K8S / "sync_monitoring.py"), "--check"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_plain_prometheus_scrape_config_keeps_exactly_the_pushgateway_endpoints():
    # Debian's promtool is built without Kubernetes discovery, so the job's logic is checked here.
    objects = render(K8S / "base")
    scrape = yaml.safe_load(one(objects, "ConfigMap", "sspo-prometheus-scrape")["data"]["scrape-configs.yaml"])
    (job,) = scrape["scrape_configs"]
    assert job["honor_labels"] is True
    assert job["kubernetes_sd_configs"] == [{"role": "endpoints"}]
    service = one(objects, "Service", "sspo-pushgateway")
    name_label = service["metadata"]["labels"]["app.kubernetes.io/name"]
    meta = {
        "__meta_kubernetes_service_label_app_kubernetes_io_name": name_label,
        "__meta_kubernetes_endpoint_port_name": service["spec"]["ports"][0]["name"],
    }
    for rule in job["relabel_configs"]:
        assert rule["action"] == "keep"
        value = ";".join(meta[label] for label in rule["source_labels"])
        assert re.fullmatch(rule["regex"], value), rule


def test_prometheus_accepts_the_alert_rules(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": one(render(K8S / "base"), "PrometheusRule", "sspo")["spec"]["groups"]}))
    result = subprocess.run([require(PROMTOOL), "check", "rules", str(rules)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
