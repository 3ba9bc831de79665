"""Training on several nodes through Kubeflow Trainer v2, pinned to v2.3.0 (API trainer.kubeflow.org/v1alpha1).

`build_trainjob` is the TrainJob that the pipeline's train step creates: a pure function of its settings.
`run_trainjob` creates it, waits for its `Complete` or `Failed` condition, and deletes it when the step fails or is
cancelled (SIGTERM), so that a cancelled pipeline run does not leave GPU nodes busy.

Trainer starts `numNodes` pods of the runtime's `node` container and gives each the PET_* variables (node count,
processes per node, node rank, rendezvous address) that torchrun reads as its flags: a bare `torchrun -m sspo train
...` then runs numNodes × numProcPerNode processes. The field names differ between Trainer releases (the runtime
patch was `podSpecOverrides` in v2.0, `podTemplateOverrides` in v2.1, `runtimePatches` since v2.2), hence the pin.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

from sspo.errors import SSPOError

TRAINER_VERSION = "v2.3.0"
GROUP, API_VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
DEFAULT_RUNTIME = "torch-distributed"
# The container Trainer injects the PET_* variables into, in the runtime's replicated job of the same name.
TRAINER_CONTAINER = "node"
# The label Kubeflow Pipelines puts on the pods of a run: `kubectl get trainjobs -l pipeline/runid=RUN` finds the
# TrainJob of a run.
RUN_ID_LABEL = "pipeline/runid"
PATCH_MANAGER = "sspo"
# The name is a DNS label (a CEL rule of the CRD) and the prefix of the pods' host names
# (<name>-node-<job>-<index>), which must stay DNS labels too.
NAME_PATTERN = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME_LENGTH = 40
# Trainer sets these for torchrun; its webhook rejects a TrainJob that sets any of them itself.
RESERVED_ENV_PREFIX = "PET_"
SHM_SIZE = "16Gi"  # NCCL and DataLoader workers share memory through /dev/shm (64 MiB in a container by default)
REQUEST_TIMEOUT = 60  # seconds for one call to the Kubernetes API
MAX_POLL_ERRORS = 10


def trainjob_name(run_id: str, prefix: str = "sspo-train") -> str:
    """The TrainJob name of a pipeline run: the same for every attempt of the step, so that a retried launcher
    finds the TrainJob an earlier attempt left instead of starting a second one that trains into the same run."""
    suffix = re.sub("[^a-z0-9]", "", run_id.lower())[:MAX_NAME_LENGTH - len(prefix) - 1]
    if not suffix:
        raise SSPOError(f"cannot name a TrainJob after the pipeline run id {run_id!r}")
    return f"{prefix}-{suffix}"


def build_trainjob(*, name: str, image: str, command: list[str], num_nodes: int, procs_per_node: int,
                   accelerator: str, cpu: str, memory: str, run_id: str = "", env: dict[str, str] | None = None,
                   secret_env: dict[str, tuple[str, str]] | None = None, runtime: str = DEFAULT_RUNTIME,
                   active_deadline_seconds: int | None = None) -> dict:
    """A TrainJob that runs `command` in `image` on `num_nodes` nodes, each with `procs_per_node` accelerators of
    the resource `accelerator` and `cpu`/`memory` (requests = limits). `env` holds plain variables, `secret_env`
    variables read from Secrets: {variable: (secret name, key)}."""
    if not (NAME_PATTERN.fullmatch(name) and len(name) <= MAX_NAME_LENGTH):
        raise SSPOError(f"TrainJob name {name!r} must be a DNS label (a-z, 0-9, '-', a letter first) of at most "
                        f"{MAX_NAME_LENGTH} characters")
    if num_nodes < 1 or procs_per_node < 1:
        raise SSPOError(f"a TrainJob needs at least one node and one process per node, not {num_nodes} × "
                        f"{procs_per_node}")
    variables = [{"name": key, "value": str(value)} for key, value in (env or {}).items()]
    variables += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": secret_key}}}
                  for key, (secret, secret_key) in (secret_env or {}).items()]
    reserved = sorted(item["name"] for item in variables if item["name"].startswith(RESERVED_ENV_PREFIX))
    if reserved:
        raise SSPOError(f"TrainJob env must not set {', '.join(reserved)}: Trainer sets the PET_* variables")
    resources = {"cpu": cpu, "memory": memory, accelerator: str(procs_per_node)}
    spec = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": runtime},
        "trainer": {
            "image": image,
            "command": [str(arg) for arg in command],
            "numNodes": num_nodes,
            # explicit: left out, Trainer's torch plugin passes "auto" to torchrun
            "numProcPerNode": procs_per_node,
            "resourcesPerNode": {"requests": resources, "limits": dict(resources)},
            "env": variables,
        },
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": TRAINER_CONTAINER,
                "template": {"spec": {"template": {"spec": {
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}],
                    "containers": [{"name": TRAINER_CONTAINER,
                                    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
                }}}},
            }]}}},
        }],
    }
    if active_deadline_seconds:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    labels = {"app.kubernetes.io/part-of": "sspo", "app.kubernetes.io/component": "train"}
    if run_id:
        labels[RUN_ID_LABEL] = run_id
    return {"apiVersion": f"{GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": name, "labels": labels},
            "spec": spec}


class Cancelled(Exception):
    """The step was told to stop (SIGTERM: the pipeline run was cancelled or its pod deleted)."""


def condition_summary(condition: dict) -> str:
    """A condition as one line: 'Failed (reason): message'."""
    reason = f" ({condition['reason']})" if condition.get("reason") else ""
    message = " ".join(str(condition.get("message") or "").split())
    return f"{condition.get('type')}{reason}" + (f": {message}" if message else "")


def finished(trainjob: dict) -> dict | None:
    """The true `Complete` or `Failed` condition of a TrainJob, None while it runs."""
    for condition in trainjob.get("status", {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition
    return None


def run_trainjob(api, namespace: str, body: dict, *, poll_seconds: float = 30.0,
                 log: Callable[[str], None] = print) -> dict:
    """Create the TrainJob `body` through `api` (a kubernetes CustomObjectsApi) and wait until it is Complete
    (returns it) or Failed (SSPOError with the reason in one line). Each change of its conditions is logged. When
    the wait ends any other way (Failed, SIGTERM, an API error), the TrainJob is deleted."""
    name = body["metadata"]["name"]
    previous = signal.signal(signal.SIGTERM, _raise_cancelled)
    created = False
    try:
        try:
            _create(api, namespace, body, log)
            created = True
            return _wait(api, namespace, name, poll_seconds, log)
        except BaseException as err:
            # A SIGTERM during the create call may come after the API server made it.
            if created or isinstance(err, Cancelled):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not stop the deletion
                why = "the step was cancelled" if isinstance(err, Cancelled) else "the step failed"
                log(f"{why}: deleting TrainJob {namespace}/{name}")
                delete_trainjob(api, namespace, name, log)
            raise
    except Cancelled:
        raise SSPOError(f"the step was cancelled while TrainJob {namespace}/{name} ran") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_cancelled(signum, frame):
    raise Cancelled()


def _create(api, namespace: str, body: dict, log) -> None:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    name = body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, body,
                                            _request_timeout=REQUEST_TIMEOUT)
        log(f"created TrainJob {namespace}/{name}: {body['spec']['trainer']['numNodes']} nodes × "
            f"{body['spec']['trainer']['numProcPerNode']} processes")
        return
    except ApiException as err:
        if err.status != 409:
            raise SSPOError(f"cannot create TrainJob {namespace}/{name}: {_api_error(err)}") from None
    except HTTPError as err:
        raise SSPOError(f"cannot create TrainJob {namespace}/{name}: {' '.join(str(err).split())}") from None
    existing = _get(api, namespace, name)
    condition = finished(existing) if existing else None
    if existing and not existing["metadata"].get("deletionTimestamp") and \
            (condition is None or condition["type"] == "Complete"):
        log(f"TrainJob {namespace}/{name} exists already (an earlier attempt of this step made it): waiting for it")
        return
    # An earlier attempt's TrainJob that failed or is going away: this attempt starts a new one, which resumes
    # the run from its latest checkpoint.
    if existing:
        log(f"replacing TrainJob {namespace}/{name} of an earlier attempt"
            + (f" ({condition_summary(condition)})" if condition else ""))
        delete_trainjob(api, namespace, name, log, wait=True)
    _create(api, namespace, body, log)


def _wait(api, namespace: str, name: str, poll_seconds: float, log) -> dict:
    seen: set[tuple] = set()
    errors = 0
    while True:
        try:
            trainjob = _get(api, namespace, name)
            errors = 0
        except SSPOError as err:
            # A restarting API server must not end a multi-node run: only errors in a row do.
            errors += 1
            if errors >= MAX_POLL_ERRORS:
                raise
            log(f"{err}; trying again")
            time.sleep(poll_seconds)
            continue
        if trainjob is None:
            raise SSPOError(f"TrainJob {namespace}/{name} was deleted while the step waited for it")
        for condition in trainjob.get("status", {}).get("conditions") or []:
            key = tuple(condition.get(field) for field in ("type", "status", "reason", "message"))
            if key not in seen:
                seen.add(key)
                log(f"TrainJob {namespace}/{name}: {condition_summary(condition)} = {condition.get('status')}")
        condition = finished(trainjob)
        if condition is not None and condition["type"] == "Complete":
            return trainjob
        if condition is not None:
            raise SSPOError(f"TrainJob {namespace}/{name} failed: {condition_summary(condition)}")
        time.sleep(poll_seconds)


def _get(api, namespace: str, name: str) -> dict | None:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return api.get_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, name,
                                                _request_timeout=REQUEST_TIMEOUT)
    except ApiException as err:
        if err.status == 404:
            return None
        raise SSPOError(f"cannot read TrainJob {namespace}/{name}: {_api_error(err)}") from None
    except HTTPError as err:
        raise SSPOError(f"cannot read TrainJob {namespace}/{name}: {' '.join(str(err).split())}") from None


def delete_trainjob(api, namespace: str, name: str, log: Callable[[str], None] = print, *, wait: bool = False,
                    poll_seconds: float = 2.0, timeout: float = 300.0) -> None:
    """Delete the TrainJob and, through the garbage collector, its pods; with `wait`, until it is gone."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        api.delete_namespaced_custom_object(GROUP, API_VERSION, namespace, PLURAL, name,
                                            propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT)
    except (ApiException, HTTPError) as err:
        if getattr(err, "status", None) != 404:
            detail = _api_error(err) if isinstance(err, ApiException) else " ".join(str(err).split())
            log(f"could not delete TrainJob {namespace}/{name}: {detail}; delete it by hand")
            return
    deadline = time.monotonic() + timeout
    while wait and _get(api, namespace, name) is not None:
        if time.monotonic() > deadline:
            raise SSPOError(f"TrainJob {namespace}/{name} is still there {timeout:.0f} s after it was deleted")
        time.sleep(poll_seconds)


def _api_error(err) -> str:
    """The Status message of an API error, else its HTTP reason, on one line."""
    import json

    try:
        message = json.loads(err.body).get("message") if err.body else None
    except (ValueError, AttributeError):
        message = None
    return f"{err.status} " + " ".join(str(message or err.reason or "").split())


def kubernetes_api(namespace: str = ""):
    """(CustomObjectsApi, namespace) from the pod's service account, or from the kubeconfig outside a cluster;
    the namespace is the pod's own unless one is given."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        if not namespace:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                namespace = f.read().strip()
    except config.ConfigException:
        # $KUBECONFIG as it is now (the client reads it once, on import)
        kubeconfig = os.environ.get("KUBECONFIG") or None
        try:
            config.load_kube_config(config_file=kubeconfig)
        except config.ConfigException as err:
            raise SSPOError(f"no Kubernetes API to create the TrainJob in: not in a pod, and no kubeconfig "
                            f"({err})") from None
        if not namespace:
            namespace = config.list_kube_config_contexts(kubeconfig)[1]["context"].get("namespace", "default")
    return client.CustomObjectsApi(), namespace
