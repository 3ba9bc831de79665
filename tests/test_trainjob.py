"""Multi-node training through Kubeflow Trainer v2.3.0: the TrainJob the pipeline creates, checked against the
Trainer v2.3.0 CRD (tests/data/trainer-v2.3.0), and the step that creates it, waits for it and deletes it, against a
loopback HTTP server that answers the Kubernetes API calls it makes."""

import copy
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml
from kfp import dsl
from kubernetes import client

from sspo.errors import SSPOError
from sspo.pipelines import CUDA_IMAGE, S3_SECRET, S3_SECRET_ENV, components, pipeline, shell, trainjob
from sspo.telemetry import PIPELINE_ENV

ROOT = Path(__file__).resolve().parents[1]
TRAINER = Path(__file__).parent / "data" / "trainer-v2.3.0"
NAMESPACE = "team-a"
RUN_ID = "0b5b0c2e-6f0e-4c35-9d1c-3a1f6f1f2e7a"
# The two CEL rules of the CRD on the TrainJob itself (x-kubernetes-validations at the schema's root).
CEL_NAME_RULES = ("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')", "size(self.metadata.name) <= 63")


def strict(schema):
    """The schema with `additionalProperties: false` on every object that lists its properties: the API server
    with strict field validation rejects unknown fields, where plain JSON schema would accept them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if schema.get("type") == "object" and isinstance(schema.get("properties"), dict) \
            and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def crd_version() -> dict:
    crd = yaml.safe_load((TRAINER / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    assert crd["spec"]["group"] == trainjob.GROUP and crd["spec"]["names"]["plural"] == trainjob.PLURAL
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == trainjob.API_VERSION]
    assert version["served"] and version["storage"]
    return version


def schema_errors(body: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(strict(crd_version()["schema"]["openAPIV3Schema"]))
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(body)]


def cel_violations(body: dict) -> list[str]:
    """The CRD's rules on the name, which JSON schema does not run, and the webhook's rule on the trainer's env."""
    name = body["metadata"]["name"]
    problems = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append("metadata.name must match RFC 1035 DNS label format")
    if len(name) > 63:
        problems.append("metadata.name must be no more than 63 characters")
    reserved = [env["name"] for env in body["spec"]["trainer"].get("env", []) if env["name"].startswith("PET_")]
    if reserved:
        problems.append(f"must not have reserved envs: {reserved}")
    return problems


def a_trainjob(**overrides) -> dict:
    settings = dict(name=trainjob.trainjob_name(RUN_ID), image=CUDA_IMAGE,
                    command=["torchrun", "-m", "sspo", "train", "--device", "cuda"], num_nodes=2, procs_per_node=8,
                    accelerator="nvidia.com/gpu", cpu="64", memory="480Gi", run_id=RUN_ID,
                    env={"PYTHONUNBUFFERED": "1"}, secret_env={"AWS_ACCESS_KEY_ID": ("sspo-s3", "AWS_ACCESS_KEY_ID")},
                    active_deadline_seconds=172800)
    return trainjob.build_trainjob(**{**settings, **overrides})


def test_the_crd_rules_checked_here_are_the_ones_the_crd_has():
    rules = [item["rule"] for item in crd_version()["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]]
    assert sorted(rules) == sorted(CEL_NAME_RULES)
    trainer = crd_version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["trainer"]
    assert trainer["properties"]["numProcPerNode"]["type"] == "integer"


def test_the_trainjob_is_valid_for_trainer_v2_3():
    body = a_trainjob()
    assert schema_errors(body) == []
    assert cel_violations(body) == []
    trainer = body["spec"]["trainer"]
    assert trainer["numNodes"] == 2
    assert trainer["numProcPerNode"] == 8 and isinstance(trainer["numProcPerNode"], int)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert body["metadata"]["labels"][trainjob.RUN_ID_LABEL] == RUN_ID


def test_strict_validation_catches_fields_of_other_trainer_versions_and_typos():
    """The negative control: without additionalProperties false, each of these would pass."""
    old = a_trainjob()
    old["spec"]["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}], "spec": {"volumes": []}}]
    del old["spec"]["runtimePatches"]
    assert any("podTemplateOverrides" in error for error in schema_errors(old))
    auto = a_trainjob()
    auto["spec"]["trainer"]["numProcPerNode"] = "auto"  # int-or-string in v2.0, an integer since
    assert any("numProcPerNode" in error for error in schema_errors(auto))
    typo = a_trainjob()
    typo["spec"]["trainer"]["resourcesPerNode"]["limit"] = {"nvidia.com/gpu": "8"}
    assert any("'limit'" in error for error in schema_errors(typo))


def test_the_runtime_patch_targets_the_container_that_trainer_configures():
    runtime = yaml.safe_load((TRAINER / "torch_distributed.yaml").read_text())
    assert runtime["metadata"]["name"] == trainjob.DEFAULT_RUNTIME
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    containers = [c["name"] for c in job["template"]["spec"]["template"]["spec"]["containers"]]
    (patch,) = a_trainjob()["spec"]["runtimePatches"]
    (patched_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert patched_job["name"] == job["name"] == trainjob.TRAINER_CONTAINER
    pod = patched_job["template"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == containers == [trainjob.TRAINER_CONTAINER]
    (mount,) = pod["containers"][0]["volumeMounts"]
    assert mount["mountPath"] == "/dev/shm" and pod["volumes"][0]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("run_id", [RUN_ID, "RUN_42", "9" * 200, "run.with.dots-and_underscores"])
def test_names_are_dns_labels_short_enough_for_the_pod_host_names(run_id):
    name = trainjob.trainjob_name(run_id)
    assert cel_violations(a_trainjob(name=name)) == []
    assert len(f"{name}-node-0-0") <= 63
    assert trainjob.trainjob_name(run_id) == name  # every attempt of the step finds the same TrainJob


@pytest.mark.parametrize("overrides, message", [
    ({"name": "Sspo-train"}, "must be a DNS label"),
    ({"name": "sspo-" + "x" * 60}, "at most 40 characters"),
    ({"name": "9-sspo"}, "must be a DNS label"),
    ({"env": {"PET_NNODES": "2"}}, "must not set PET_NNODES"),
    ({"secret_env": {"PET_MASTER_ADDR": ("s", "k")}}, "must not set PET_MASTER_ADDR"),
    ({"procs_per_node": 0}, "at least one node and one process per node"),
])
def test_the_builder_refuses_what_the_crd_or_the_webhook_would(overrides, message):
    with pytest.raises(SSPOError, match=message):
        a_trainjob(**overrides)


def test_an_empty_run_id_names_no_trainjob():
    with pytest.raises(SSPOError, match="cannot name a TrainJob"):
        trainjob.trainjob_name("{}")


class KubernetesAPI:
    """A loopback HTTP server that answers the calls the train step makes on trainjobs (create, get, delete) as
    the API server with Kubeflow Trainer installed would: it keeps what is created, gives the n-th read of a
    TrainJob the n-th entry of `conditions` (the last one from then on) as its status, and deletes on request."""

    def __init__(self, conditions: list[list[dict]], existing: dict | None = None):
        self.conditions = conditions
        self.objects: dict[str, dict] = dict(existing or {})
        self.reads: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                api.answer(self)

            do_GET = do_DELETE = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, handler):
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length) or b"null")
        path = urllib.parse.urlsplit(handler.path).path
        self.requests.append((handler.command, path))
        prefix = f"/apis/{trainjob.GROUP}/{trainjob.API_VERSION}/namespaces/{NAMESPACE}/{trainjob.PLURAL}"
        name = path.removeprefix(prefix + "/") if path.startswith(prefix + "/") else None
        if handler.command == "POST" and path == prefix:
            name = body["metadata"]["name"]
            if name in self.objects:
                return self.reply(handler, 409, status(409, "AlreadyExists", f'trainjobs "{name}" already exists'))
            self.objects[name] = body
            self.created.append(body)
            return self.reply(handler, 201, body)
        if name is None:
            return self.reply(handler, 404, status(404, "NotFound", f"no route {path}"))
        if name not in self.objects:
            return self.reply(handler, 404, status(404, "NotFound", f'trainjobs "{name}" not found'))
        if handler.command == "DELETE":
            del self.objects[name]
            return self.reply(handler, 200, status(200, "", ""))
        read = self.reads.get(name, 0)
        self.reads[name] = read + 1
        found = copy.deepcopy(self.objects[name])
        if "status" not in found:
            found["status"] = {"conditions": self.conditions[min(read, len(self.conditions) - 1)]}
        return self.reply(handler, 200, found)

    @staticmethod
    def reply(handler, code: int, payload: dict):
        data = json.dumps(payload).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def api(self):
        return client.CustomObjectsApi(client.ApiClient(client.Configuration(host=self.url)))


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Success" if code < 300 else "Failure",
            "reason": reason, "message": message, "code": code}


def condition(kind: str, reason: str = "", message: str = "", state: str = "True") -> dict:
    return {"type": kind, "status": state, "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-01T00:00:00Z"}


RUNNING = [condition("Suspended", "Resumed", "TrainJob is resumed", "False")]
COMPLETE = RUNNING + [condition("Complete", "JobsCompleted", "TrainJob is completed")]
FAILED = RUNNING + [condition("Failed", "BackoffLimitExceeded", "Pod node-1 failed:\n  exit code 137 (OOMKilled)")]


@pytest.fixture
def kube():
    servers = []

    def start(conditions, existing=None) -> KubernetesAPI:
        servers.append(KubernetesAPI(conditions, existing))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_complete_trainjob_ends_the_step_and_each_change_is_logged_once(kube):
    server = kube([[], RUNNING, RUNNING, COMPLETE])
    lines = []
    done = trainjob.run_trainjob(server.api(), NAMESPACE, a_trainjob(), poll_seconds=0.01, log=lines.append)
    name = trainjob.trainjob_name(RUN_ID)
    assert trainjob.finished(done)["type"] == "Complete"
    assert server.created == [a_trainjob()]
    assert lines[0] == f"created TrainJob {NAMESPACE}/{name}: 2 nodes × 8 processes"
    assert lines[1:] == [f"TrainJob {NAMESPACE}/{name}: Suspended (Resumed): TrainJob is resumed = False",
                         f"TrainJob {NAMESPACE}/{name}: Complete (JobsCompleted): TrainJob is completed = True"]
    assert name in server.objects  # a completed TrainJob stays for its logs


def test_a_failed_trainjob_fails_the_step_in_one_line_and_is_deleted(kube):
    server = kube([RUNNING, FAILED])
    with pytest.raises(SSPOError) as failure:
        trainjob.run_trainjob(server.api(), NAMESPACE, a_trainjob(), poll_seconds=0.01, log=lambda line: None)
    name = trainjob.trainjob_name(RUN_ID)
    assert str(failure.value) == (f"TrainJob {NAMESPACE}/{name} failed: Failed (BackoffLimitExceeded): Pod node-1 "
                                  "failed: exit code 137 (OOMKilled)")
    assert server.objects == {}
    assert server.requests[-1][0] == "DELETE"


def test_a_trainjob_deleted_under_the_step_fails_it(kube):
    server = kube([RUNNING])
    threading.Timer(0.2, lambda: server.objects.clear()).start()
    with pytest.raises(SSPOError, match="was deleted while the step waited for it"):
        trainjob.run_trainjob(server.api(), NAMESPACE, a_trainjob(), poll_seconds=0.01, log=lambda line: None)


def test_a_refused_create_is_one_line(kube):
    server = kube([RUNNING])
    body = a_trainjob()
    body["metadata"]["name"] = "x"  # routes nowhere on this server: a 404 for the create, as for a missing CRD
    body_path = f"/apis/{trainjob.GROUP}/{trainjob.API_VERSION}/namespaces/other/{trainjob.PLURAL}"
    with pytest.raises(SSPOError, match=r"^cannot create TrainJob other/x: 404 no route " + re.escape(body_path)):
        trainjob.run_trainjob(server.api(), "other", body, poll_seconds=0.01, log=lambda line: None)
    assert server.requests == [("POST", body_path)]  # nothing to delete: it was never made


def test_a_retried_step_waits_for_the_running_trainjob_of_its_earlier_attempt(kube):
    name = trainjob.trainjob_name(RUN_ID)
    server = kube([RUNNING, COMPLETE], existing={name: a_trainjob()})
    lines = []
    trainjob.run_trainjob(server.api(), NAMESPACE, a_trainjob(), poll_seconds=0.01, log=lines.append)
    assert server.created == []
    assert "exists already" in lines[0]


def test_a_retried_step_replaces_the_failed_trainjob_of_its_earlier_attempt(kube):
    name = trainjob.trainjob_name(RUN_ID)
    earlier = {**a_trainjob(), "status": {"conditions": FAILED}}
    server = kube([RUNNING, COMPLETE], existing={name: earlier})
    lines = []
    trainjob.run_trainjob(server.api(), NAMESPACE, a_trainjob(), poll_seconds=0.01, log=lines.append)
    assert server.created == [a_trainjob()]
    assert lines[0].startswith(f"replacing TrainJob {NAMESPACE}/{name} of an earlier attempt (Failed")


WAIT_IN_A_PROCESS = """
import json, sys
from kfp import dsl
from kubernetes import client
from sspo.pipelines import trainjob
api = client.CustomObjectsApi(client.ApiClient(client.Configuration(host=sys.argv[1])))
trainjob.run_trainjob(api, sys.argv[2], json.loads(sys.argv[3]), poll_seconds=0.05)
"""


def test_sigterm_deletes_the_trainjob(kube):
    """What a cancelled pipeline run does to the step's pod: SIGTERM to its process."""
    server = kube([RUNNING])
    process = subprocess.Popen([sys.executable, "-c", WAIT_IN_A_PROCESS, server.url, NAMESPACE,
                                json.dumps(a_trainjob())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not server.reads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.reads, "the step never polled its TrainJob"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert f"the step was cancelled: deleting TrainJob {NAMESPACE}/" in out
    assert "SSPOError: the step was cancelled while TrainJob" in err
    assert server.requests[-1][0] == "DELETE" and server.objects == {}


def test_the_pipeline_service_account_may_do_what_the_step_does(kube):
    """create, get and delete on trainjobs: the verbs of the requests the step makes, in k8s/base/rbac.yaml."""
    server = kube([RUNNING, FAILED])
    with pytest.raises(SSPOError):
        trainjob.run_trainjob(server.api(), NAMESPACE, a_trainjob(), poll_seconds=0.01, log=lambda line: None)
    verbs = {{"POST": "create", "GET": "get", "DELETE": "delete"}[method] for method, _ in server.requests}
    documents = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "rbac.yaml").read_text()))
    (role,) = [doc for doc in documents if doc["kind"] == "Role"]
    (rule,) = [rule for rule in role["rules"] if trainjob.PLURAL in rule["resources"]]
    assert rule["apiGroups"] == [trainjob.GROUP]
    assert set(rule["verbs"]) == verbs == {"create", "get", "delete"}


def resolved_inputs(spec: dict, task_name: str, parameters: dict) -> dict:
    """The parameter values the task `task_name` gets in a run with `parameters` (defaults for the rest), resolved
    the way the KFP driver does it: through the condition sub-DAGs down to the task, constants and placeholders
    ({{$.inputs.parameters['...']}}, {{$.pipeline_job_uuid}}) included."""
    root = spec["root"]["inputDefinitions"]["parameters"]
    values = {name: parameters.get(name, item.get("defaultValue")) for name, item in root.items()}

    def find(component: dict, values: dict):
        for name, task in component.get("dag", {}).get("tasks", {}).items():
            resolved = {}
            for key, source in task.get("inputs", {}).get("parameters", {}).items():
                if "componentInputParameter" in source:
                    resolved[key] = values.get(source["componentInputParameter"])  # None: another task's output
                elif "runtimeValue" in source:
                    resolved[key] = source["runtimeValue"]["constant"]
            resolved = {key: substitute(value, resolved) for key, value in resolved.items()}
            if name == task_name:
                return task, resolved
            found = find(spec["components"][task["componentRef"]["name"]], resolved)
            if found:
                return found
        return None

    return find(spec["root"], values)


def substitute(value, inputs: dict):
    if not isinstance(value, str):
        return value
    value = value.replace("{{$.pipeline_job_uuid}}", RUN_ID)
    return re.sub(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", lambda m: str(inputs[m.group(1)]), value)


@pytest.fixture(scope="module")
def compiled_spec(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    pipeline.compile_pipeline(str(path), cuda_image="gpu.example.org/sspo:9-cuda")
    return yaml.safe_load_all(path.read_text()).__next__()


def test_two_nodes_of_eight_gpus_make_a_trainjob_of_the_cuda_image_with_sixteen_processes(compiled_spec, kube,
                                                                                           tmp_path, monkeypatch):
    """The compiled pipeline with num_nodes=2, gpus_per_node=8: the launcher step (a small CPU pod) gets the
    parameters and creates the TrainJob through the pod's service account (here: a kubeconfig). Its body runs
    with the inputs the compiled pipeline gives it."""
    _, inputs = resolved_inputs(compiled_spec, "train-nodes", {
        "num_nodes": 2, "gpus_per_node": 8, "pushgateway_url": "http://pgw:9091", "model_uri": "s3://models/base",
        "registry_url": "s3://registry"})
    launcher = compiled_spec["deploymentSpec"]["executors"]["exec-train-nodes"]["container"]
    assert "accelerator" not in launcher.get("resources", {})
    server = kube([COMPLETE])  # at the first look: the step polls every 30 s
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server.url}}],
        "users": [{"name": "test", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv(PIPELINE_ENV, pipeline.PIPELINE_NAME)
    run_uri = str(tmp_path / "run")
    arguments = {name: value for name, value in inputs.items() if not name.startswith("pipelinechannel--")}
    result = components.train_nodes.python_func(**arguments, data=dsl.Dataset(uri="s3://data/prepared"),
                                                run=dsl.Model(uri=run_uri))
    assert result == (run_uri,)
    (body,) = server.created
    assert schema_errors(body) == [] and cel_violations(body) == []
    trainer = body["spec"]["trainer"]
    assert trainer["image"] == "gpu.example.org/sspo:9-cuda"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": pipeline.TRAIN_CPU, "memory": pipeline.TRAIN_MEMORY,
                                                     "nvidia.com/gpu": "8"}
    command = trainer["command"]
    assert command[:5] == ["torchrun", "-m", "sspo", "train", "--params"]
    options = dict(zip(command[6::2], command[7::2]))
    assert options["--output"] == run_uri and options["--device"] == "cuda"
    assert (options["--model"], options["--data"]) == ("s3://models/base", "s3://data/prepared")
    assert (options["--init-from"], options["--replay-from"]) == ("", "")
    assert options["--pushgateway"] == "http://pgw:9091" and options["--steps"] == str(inputs["steps"])
    env = {item["name"]: item for item in trainer["env"]}
    assert env[PIPELINE_ENV]["value"] == pipeline.PIPELINE_NAME
    for variable, key in S3_SECRET_ENV.items():
        assert env[variable]["valueFrom"] == {"secretKeyRef": {"name": S3_SECRET, "key": key}}
    assert body["metadata"]["labels"][trainjob.RUN_ID_LABEL] == RUN_ID
    assert body["spec"]["runtimeRef"]["name"] == trainjob.DEFAULT_RUNTIME
    assert ("POST", f"/apis/{trainjob.GROUP}/{trainjob.API_VERSION}/namespaces/{NAMESPACE}/trainjobs") in \
        server.requests


def test_one_node_of_four_gpus_is_one_pod_that_asks_for_four_and_starts_four_processes(compiled_spec):
    _, inputs = resolved_inputs(compiled_spec, "train", {"num_nodes": 1, "gpus_per_node": 4})
    resources = compiled_spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert substitute(resources["accelerator"]["resourceCount"], inputs) == "4"
    assert substitute(resources["accelerator"]["resourceType"], inputs) == "nvidia.com/gpu"
    for field in ("resourceCpuRequest", "resourceCpuLimit"):
        assert substitute(resources[field], inputs) == pipeline.TRAIN_CPU
    for field in ("resourceMemoryRequest", "resourceMemoryLimit"):
        assert substitute(resources[field], inputs) == pipeline.TRAIN_MEMORY
    assert inputs["gpus_per_node"] == 4
    command = shell.sspo_command(shell.stage_argv("train", steps=3, device="cuda"), inputs["gpus_per_node"])
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                       "-m", "sspo", "train", "--params", "", "--steps", "3", "--device", "cuda"]
    assert shell.sspo_command(["train"], 1) == [sys.executable, "-m", "sspo", "train"]


@pytest.mark.slow  # two fresh interpreters import torch
def test_a_pod_with_two_gpus_runs_two_training_processes_that_insist_on_cuda(tmp_path):
    """On this CPU-only machine each of the two processes torchrun starts refuses to train without CUDA, unless the
    other's refusal came first and torchrun stopped it (SIGTERM) before it got there: both were started."""
    result = subprocess.run(shell.sspo_command(shell.stage_argv("train", output=str(tmp_path / "run"),
                                                                device="cuda"), 2),
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    refusals = result.stderr.count("device cuda was asked for")
    stopped = result.stderr.count("Signal 15 (SIGTERM) received by PID")
    assert refusals == 2 or (refusals, stopped) == (1, 1), result.stderr[-3000:]
