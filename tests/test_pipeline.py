"""The KFP pipeline: its compiled structure, the checked-in YAML, the CLI's errors, and a whole run under kfp.local."""

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp import dsl
from kfp.pipeline_spec import pipeline_spec_pb2

from sspo import cli, registry, storage
from sspo.config import STAGES, coerce, field_types
from sspo.errors import SSPOError
from sspo.evaluate.results import Evaluation, WinRate
from sspo.pipelines import CUDA_IMAGE, IMAGE, pipeline, shell
from sspo.pipelines.cli import check_cron, convert_parameters

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "pipelines" / "sspo_pipeline.yaml"
REQUIRED = ["--param", "model_uri=s3://models/base", "--param", "data_uri=s3://data/raw",
            "--param", "registry_url=s3://registry"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    pipeline.compile_pipeline(str(path))
    documents = list(yaml.safe_load_all(path.read_text()))
    spec = json_format.ParseDict(documents[0], pipeline_spec_pb2.PipelineSpec())  # unknown fields are rejected
    return spec, documents


def upstream(dag) -> dict[str, set[str]]:
    return {name: set(task.dependent_tasks) for name, task in dag.tasks.items()}


def all_tasks(spec) -> dict:
    """Every task of the pipeline, in the root DAG and in the DAGs of its conditions and loops, by name."""
    found, dags = {}, [spec.root.dag]
    while dags:
        for name, task in dags.pop().tasks.items():
            found[name] = task
            if spec.components[task.component_ref.name].WhichOneof("implementation") == "dag":
                dags.append(spec.components[task.component_ref.name].dag)
    return found


def inner(spec, task) -> dict:
    return dict(spec.components[task.component_ref.name].dag.tasks)


def test_dag_runs_the_stages_in_order_and_promotes_and_exports_only_behind_the_gate(compiled):
    spec, _ = compiled
    root = upstream(spec.root.dag)
    (branches,) = [name for name in root if name.startswith("condition-branches-")]
    assert root[branches] >= {"merge-parts"}  # training starts once the dataset is complete
    assert root["register"] >= {branches}
    assert root["evaluate"] == {"register"}
    assert root["compare"] == {"evaluate"}
    (gate_name,) = set(root) - {branches, "register", "evaluate", "compare"} - \
        {name for name in root if "parts" in name or name.startswith("for-loop")}
    gate = spec.root.dag.tasks[gate_name]
    assert gate.trigger_policy.condition == "inputs.parameter_values['pipelinechannel--compare-Output'] == true"
    assert root[gate_name] == {"compare", "evaluate", "register"}
    gated = inner(spec, gate)
    (export_branch,) = set(gated) - {"promote"}
    assert gated["promote"].inputs.parameters["version"].component_input_parameter == \
        "pipelinechannel--register-version"
    # the export runs after the promotion, only when the `export` parameter is true
    assert upstream(spec.components[gate.component_ref.name].dag)[export_branch] == {"promote"}
    assert gated[export_branch].trigger_policy.condition == \
        "inputs.parameter_values['pipelinechannel--export'] == true"
    exported = inner(spec, gated[export_branch])
    assert list(exported) == ["export"]
    assert exported["export"].inputs.parameters["version"].component_input_parameter == \
        "pipelinechannel--register-version"
    assert exported["export"].inputs.artifacts["evaluation"].component_input_artifact == \
        "pipelinechannel--evaluate-evaluation"
    assert spec.root.input_definitions.parameters["export"].default_value.bool_value is True


def test_one_node_trains_in_its_pod_and_more_nodes_through_a_trainjob(compiled):
    spec, _ = compiled
    branches = {task.trigger_policy.condition: inner(spec, task)
                for task in inner(spec, spec.root.dag.tasks[next(name for name in spec.root.dag.tasks
                                                                 if name.startswith("condition-branches-"))]).values()}
    one_node = "int(inputs.parameter_values['pipelinechannel--num_nodes']) == 1"
    assert {condition: list(tasks) for condition, tasks in branches.items()} == {
        one_node: ["train"], f"!({one_node})": ["train-nodes"]}
    # register gets the run's URL from whichever branch ran
    register = spec.root.dag.tasks["register"]
    source = register.inputs.parameters["run_uri"].task_output_parameter
    branches_spec = spec.components[spec.root.dag.tasks[source.producer_task].component_ref.name]
    selectors = branches_spec.dag.outputs.parameters[source.output_parameter_key].value_from_oneof.parameter_selectors
    assert [selector.output_parameter_key for selector in selectors] == ["pipelinechannel--train-run_uri",
                                                                         "pipelinechannel--train-nodes-run_uri"]
    train_nodes = all_tasks(spec)["train-nodes"]
    assert train_nodes.inputs.parameters["image"].runtime_value.constant.string_value == CUDA_IMAGE
    assert train_nodes.inputs.parameters["run_id"].runtime_value.constant.string_value == \
        dsl.PIPELINE_JOB_ID_PLACEHOLDER
    for name in ("num_nodes", "gpus_per_node", "accelerator", "cpu_per_node", "memory_per_node", "trainer_runtime",
                 "init_from_alias", "replay_last_versions"):
        assert train_nodes.inputs.parameters[name].component_input_parameter == f"pipelinechannel--{name}", name


def test_the_gpu_steps_ask_for_gpus_cpu_and_memory_from_the_parameters(compiled):
    spec, documents = compiled
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    resources = executors["exec-train"]["container"]["resources"]
    channel = "{{$.inputs.parameters['pipelinechannel--%s']}}"
    assert resources["accelerator"] == {"resourceType": channel % "accelerator",
                                        "resourceCount": channel % "gpus_per_node"}
    assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == channel % "cpu_per_node"
    assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == channel % "memory_per_node"
    assert executors["exec-evaluate"]["container"]["resources"]["accelerator"] == {
        "resourceType": channel % "accelerator", "resourceCount": channel % "eval_gpus"}
    for name, executor in executors.items():
        if name not in ("exec-train", "exec-evaluate"):
            assert "accelerator" not in executor["container"].get("resources", {}), name
    (shm,) = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["emptyDirMounts"]
    assert (shm["mountPath"], shm["medium"]) == ("/dev/shm", "Memory")
    parameters = spec.root.input_definitions.parameters
    assert parameters["num_nodes"].default_value.number_value == 1
    assert parameters["gpus_per_node"].default_value.number_value == 1
    assert parameters["accelerator"].default_value.string_value == "nvidia.com/gpu"


def test_gpu_steps_run_in_the_cuda_image_and_the_others_in_the_cpu_image(compiled):
    spec, _ = compiled
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == (CUDA_IMAGE if name in pipeline.GPU_EXECUTORS else IMAGE), name
        assert "pip install" not in " ".join(container["command"]), name  # the image already holds kfp and sspo
    assert set(pipeline.GPU_EXECUTORS) <= set(executors)


def test_caching_and_retries(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    for name in ("train", "train-nodes", "register", "compare", "promote", "export"):
        assert not tasks[name].caching_options.enable_cache, name
    for name in ("train", "train-nodes"):
        assert tasks[name].retry_policy.max_retry_count == 1, name
    for name in ("register", "evaluate", "compare", "promote", "export"):
        retry = tasks[name].retry_policy
        assert retry.max_retry_count == pipeline.IO_RETRY["num_retries"], name
        assert retry.backoff_factor == pipeline.IO_RETRY["backoff_factor"], name
        assert retry.backoff_duration.seconds == 30, name


def test_s3_credentials_come_from_the_secret_never_from_parameters(compiled):
    spec, documents = compiled
    executors = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(json_format.MessageToDict(spec.deployment_spec)["executors"])
    for name, config in executors.items():
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == pipeline.S3_SECRET, name
        env = {item["envVar"]: item["secretKey"] for item in secret["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(env), name
    parameters = set(spec.root.input_definitions.parameters)
    assert {"model_uri", "data_uri", "objective", "steps", "beta", "replay_from", "min_win_rate", "min_improvement",
            "registry_url", "model_name"} <= parameters
    assert not [p for p in parameters if any(word in p for word in ("secret", "key", "password", "token"))]


def test_checked_in_pipeline_is_up_to_date(compiled):
    _, documents = compiled
    assert list(yaml.safe_load_all(CHECKED_IN.read_text())) == documents, \
        "pipelines/sspo_pipeline.yaml is stale: run `sspo pipeline compile`"


@pytest.mark.parametrize("options, cpu, cuda", [
    (["--image", "example.org/sspo:1", "--cuda-image", "example.org/sspo:1-cuda"], "example.org/sspo:1",
     "example.org/sspo:1-cuda"),
    (["--cuda-image", "example.org/sspo:1-cuda"], IMAGE, "example.org/sspo:1-cuda"),
    (["--image", "example.org/sspo:1"], "example.org/sspo:1", CUDA_IMAGE),
])
def test_compile_command_can_name_other_images(options, cpu, cuda, tmp_path):
    output = tmp_path / "out" / "pipeline.yaml"
    assert cli.main(["pipeline", "compile", "--output", str(output), *options]) == 0
    documents = list(yaml.safe_load_all(output.read_text()))
    spec = json_format.ParseDict(documents[0], pipeline_spec_pb2.PipelineSpec())
    images = {name: e["container"]["image"] for name, e in documents[0]["deploymentSpec"]["executors"].items()}
    assert images == {name: cuda if name in pipeline.GPU_EXECUTORS else cpu for name in images}
    # the TrainJob of a multi-node training runs the CUDA image too
    assert all_tasks(spec)["train-nodes"].inputs.parameters["image"].runtime_value.constant.string_value == cuda


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["submit", *REQUIRED, "--param", "stepz=3"], "unknown pipeline parameter(s): stepz"),
    (["submit", *REQUIRED, "--param", "steps=many"], "invalid pipeline parameter: steps='many' is not a valid int"),
    (["submit", "--param", "steps=3"], "missing required pipeline parameter(s): model_uri, data_uri, registry_url"),
    (["schedule", "create", *REQUIRED, "--name", "nightly", "--cron", "0 3 * * *"], "has 5 fields"),
])
def test_bad_parameters_fail_before_any_connection(argv, message, capsys):
    host = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["pipeline", *argv, "--host", host]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.fixture
def kfp_endpoint():
    """A loopback HTTP server standing in for the KFP API: it records every request and answers 404, except for
    the health check (kfp.Client retries that one for 25 s)."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append(f"{self.command} {self.path}")
            body = b'{"multi_user": false}' if self.path.endswith("/healthz") else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()
    server.server_close()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sspo pipeline: error: "), err
    return lines[0]


def test_a_valid_submit_reaches_the_endpoint(kfp_endpoint, capsys):
    """The control for the tests below: a submit that passes every check does send requests."""
    host, received = kfp_endpoint
    argv = ["pipeline", "submit", "--host", host, *REQUIRED, "--param", "steps=3", "--param", "eval_seeds=0,1",
            "--param", "eval_prompts=toy:heldout", "--param", "min_improvement=-0.1"]
    assert cli.main(argv) == 2
    assert received
    assert f"Kubeflow Pipelines at {host} answered 404" in one_error_line(capsys)


# The value as given, and what the one error line says about it: the pipeline parameter, never the config field.
BAD_VALUES = [
    ("steps", "-5", "steps=-5: steps must be positive"),
    ("learning_rate", "nan", "learning_rate=nan: learning_rate must be positive"),
    ("objective", "bogus", "objective='bogus': objective must be one of sspo, dpo, spin, sft"),
    ("beta", "-1", "beta=-1.0: beta must be positive"),
    ("data_format", "tar", "data_format='tar': data_format must be auto, folder, jsonl or parquet"),
    ("data_limit", "-1", "data_limit=-1: data_limit must be 0 (all) or positive"),
    ("registry_url", "", "registry_url='': registry_url must be a URL"),
    ("eval_seeds", "", "eval_seeds='': eval_seeds must list at least one seed"),
    ("eval_seeds", "0,x", "eval_seeds='x' is not a valid int"),
    ("eval_sample_steps", "0", "eval_sample_steps=0: eval_sample_steps must be positive"),
    ("eval_guidance", "nan", "eval_guidance=nan: eval_guidance must be a number, not NaN"),
    ("model_name", "my model", "model_name='my model': model_name must use letters, digits"),
    ("min_win_rate", "nan", "min_win_rate=nan: min_win_rate must be between 0 and 1"),
    ("min_improvement", "nan", "min_improvement=nan: min_improvement must be a number, not NaN"),
    ("eval_prompts", "toy:train", "promotion_split='heldout': promotion_split must be one of the prompt sets of "
                                  "eval_prompts (train)"),
    ("num_nodes", "0", "num_nodes=0: num_nodes must be positive"),
    ("gpus_per_node", "-1", "gpus_per_node=-1: gpus_per_node must be 0 (train on the CPU, one node only) or positive"),
    ("eval_gpus", "-2", "eval_gpus=-2: eval_gpus must be 0 (evaluate on the CPU) or positive"),
    ("accelerator", "gpu", "accelerator='gpu': accelerator must be an extended resource name such as nvidia.com/gpu"),
    ("cpu_per_node", "8 cores", "cpu_per_node='8 cores': cpu_per_node must be a positive Kubernetes quantity"),
    ("memory_per_node", "0Gi", "memory_per_node='0Gi': memory_per_node must be a positive Kubernetes quantity"),
    ("trainer_runtime", "Torch_Distributed", "trainer_runtime='Torch_Distributed': trainer_runtime must be the name "
                                             "of a ClusterTrainingRuntime"),
    ("init_from_alias", "prod uction", "init_from_alias='prod uction': init_from_alias must be '' (the base model) "
                                       "or an alias name"),
    ("replay_last_versions", "-1", "replay_last_versions=-1: replay_last_versions must be 0 (none) or positive"),
]
# A YAML value of the wrong kind in a --params-file: a bool is no int, a mapping or list no str or number.
BAD_FILE_VALUES = [
    ("steps", True, "steps=True is not a valid int"),
    ("learning_rate", False, "learning_rate=False is not a valid float"),
    ("objective", {"name": "sspo"}, "objective={'name': 'sspo'} is not a valid str"),
    ("beta", [400], "beta=[400] is not a valid float"),
]


def pipeline_command(command: str, host: str, tmp_path: Path) -> list[str]:
    return {"submit": ["submit", "--host", host, *REQUIRED],
            "schedule": ["schedule", "create", "--host", host, *REQUIRED, "--name", "nightly",
                         "--cron", "0 0 3 * * *"],
            "run-local": ["run-local", "--workdir", str(tmp_path / "work")]}[command]


def assert_nothing_sent_or_run(received: list, tmp_path: Path) -> None:
    assert received == []
    assert not (tmp_path / "work").exists()  # run-local made no toy world, model or kfp.local run


@pytest.mark.parametrize("command", ["submit", "schedule", "run-local"])
@pytest.mark.parametrize("name, value, message", BAD_VALUES)
def test_a_value_the_stage_rules_reject_stops_before_anything_is_sent(command, name, value, message, kfp_endpoint,
                                                                      tmp_path, capsys):
    host, received = kfp_endpoint
    argv = ["pipeline", *pipeline_command(command, host, tmp_path), "--param", f"{name}={value}"]
    assert cli.main(argv) == 2
    assert one_error_line(capsys).startswith(f"sspo pipeline: error: invalid pipeline parameter: {message}")
    assert_nothing_sent_or_run(received, tmp_path)


@pytest.mark.parametrize("command", ["submit", "schedule", "run-local"])
@pytest.mark.parametrize("name, value, message", BAD_FILE_VALUES)
def test_a_params_file_value_of_the_wrong_kind_stops_before_anything_is_sent(command, name, value, message,
                                                                             kfp_endpoint, tmp_path, capsys):
    host, received = kfp_endpoint
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump({name: value}))
    argv = ["pipeline", *pipeline_command(command, host, tmp_path), "--params-file", str(params)]
    assert cli.main(argv) == 2
    assert one_error_line(capsys) == f"sspo pipeline: error: invalid pipeline parameter: {message}"
    assert_nothing_sent_or_run(received, tmp_path)


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers
def test_a_bad_parameter_is_all_a_real_process_writes_to_stderr(kfp_endpoint, tmp_path):
    host, received = kfp_endpoint
    params = tmp_path / "run.yaml"
    params.write_text("steps: true\n")
    result = subprocess.run([sys.executable, "-m", "sspo", "pipeline", "submit", "--host", host, *REQUIRED,
                             "--params-file", str(params)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "sspo pipeline: error: invalid pipeline parameter: steps=True is not a valid int\n"
    assert received == []


@pytest.mark.parametrize("cron, message", [
    ("a b c d e f", "second 'a' is not valid; use 0-59"),
    ("0 60 * * * *", "minute '60' is not valid; use 0-59"),
    ("0 0 3 * * 7", "day of week '7' is not valid; use 0-6 or SUN-SAT"),
    ("0 0 3 1-31/0 * *", "day of month '1-31/0' is not valid"),
    ("0 0 3 * * * *", "has 7 fields"),
])
def test_an_invalid_cron_stops_before_anything_is_sent(cron, message, kfp_endpoint, capsys):
    host, received = kfp_endpoint
    argv = ["pipeline", "schedule", "create", "--host", host, *REQUIRED, "--name", "nightly", "--cron", cron]
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"sspo pipeline: error: cron {cron!r}") and message in line
    assert received == []


@pytest.mark.parametrize("cron", ["0 0 3 * * *", "0 0/10 * * * ?", "*/15 0-30/5 1,2,23 ? JAN-mar mon-FRI",
                                  "59 59 23 31 12 6", "0  0 3 * *  sun"])
def test_robfig_cron_specs_are_accepted(cron):
    assert check_cron(cron) == " ".join(cron.split())


@pytest.mark.parametrize("cron", ["60 * * * * *", "* * 24 * * *", "* * * 0 * *", "* * * * 13 *", "* * * * jun-jan *",
                                  "* * * * * 7", "* * * * * sunday", "*/0 * * * * *", "5-1 * * * * *",
                                  "1,,2 * * * * *", "1-2-3 * * * * *", "1/2/3 * * * * *", "*/x * * * * *",
                                  "-1 * * * * *", "L * * * * *", "@daily"])
def test_invalid_cron_specs_are_refused(cron):
    with pytest.raises(SSPOError, match="^cron "):
        check_cron(cron)


# Pipeline parameters that no stage config holds; sspo.pipelines.cli has their rules.
PIPELINE_ONLY = {"promotion_split", "min_win_rate", "min_improvement", "export", "encode_data", "num_nodes",
                 "gpus_per_node", "accelerator", "cpu_per_node", "memory_per_node", "trainer_runtime", "eval_gpus",
                 "init_from_alias", "replay_last_versions"}


def test_every_parameter_maps_to_stage_config_fields_or_has_its_own_rules():
    mapped = {parameter for fields in pipeline.STAGE_FIELDS.values() for parameter in fields}
    assert mapped | PIPELINE_ONLY == set(pipeline.sspo_pipeline.component_spec.inputs)
    assert not mapped & PIPELINE_ONLY
    assert set(pipeline.STAGE_FIELDS) == set(pipeline.ARTIFACT_FIELDS)
    for stage, fields in pipeline.STAGE_FIELDS.items():
        names = set(field_types(STAGES[stage]))
        assert set(fields.values()) | set(pipeline.ARTIFACT_FIELDS[stage]) <= names, stage


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate"])
def test_a_parameter_defaults_to_its_stage_config_field(stage):
    """A check that the mapping is the right one: each optional parameter's default is its field's default."""
    cls = STAGES[stage]
    types, defaults = field_types(cls), cls()
    inputs = pipeline.sspo_pipeline.component_spec.inputs
    for parameter, name in pipeline.STAGE_FIELDS[stage].items():
        if inputs[parameter].optional:
            assert coerce(parameter, types[name], inputs[parameter].default) == getattr(defaults, name), parameter


@dsl.component(base_image=IMAGE)
def takes_every_parameter_type(flag: bool, count: int, rate: float, name: str, items: list, options: dict):
    pass


@dsl.pipeline
def every_parameter_type(flag: bool, count: int, rate: float, name: str, items: list, options: dict):
    takes_every_parameter_type(flag=flag, count=count, rate=rate, name=name, items=items, options=options)


@pytest.mark.parametrize("flag", ["true", "False", "yes", "no", "on", "OFF", "1", "0", True])
def test_pipeline_parameters_convert_as_config_values_do(flag):
    given = {"flag": flag, "count": "3", "rate": "0.5", "name": "x", "items": "[1, \"a\"]", "options": {"k": 1}}
    values = convert_parameters(every_parameter_type, given)
    assert values.pop("flag") is coerce("shared_noise", bool, flag)
    assert values == {"count": 3, "rate": 0.5, "name": "x", "items": [1, "a"], "options": {"k": 1}}


@pytest.mark.parametrize("name, value", [("flag", "maybe"), ("count", "1.5"), ("items", "{}"), ("options", "a=1")])
def test_a_bad_pipeline_parameter_names_itself(name, value):
    given = {"flag": "true", "count": "3", "rate": "0.5", "name": "x", "items": "[]", "options": "{}", name: value}
    with pytest.raises(SSPOError, match=f"^invalid pipeline parameter: {name}="):
        convert_parameters(every_parameter_type, given)


@pytest.mark.parametrize("argv", [
    ["schedule", "create", *REQUIRED, "--name", "nightly", "--cron", "0 0 3 * * *"],
    ["schedule", "list"],
    ["schedule", "disable", "some-id"],
])
def test_unreachable_endpoint_is_one_clear_error(argv, capsys):
    host = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["pipeline", *argv, "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sspo pipeline: error: cannot reach Kubeflow Pipelines at {host}")
    assert err.count("\n") == 1


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers
def test_submit_to_unreachable_endpoint_exits_2_without_traceback(tmp_path):
    host = f"http://127.0.0.1:{closed_port()}"
    result = subprocess.run([sys.executable, "-m", "sspo.cli", "pipeline", "submit", "--host", host, *REQUIRED],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"sspo pipeline: error: cannot reach Kubeflow Pipelines at {host}" in result.stderr


def evaluation(trained: float, rate: float) -> Evaluation:
    """Results as `sspo evaluate` records them, with the primary scorer's numbers that the promotion reads."""
    results = Evaluation.new({}, ["oracle", "clipscore"], ["heldout"], ["base", "trained"])
    for model, mean in (("base", 0.4), ("trained", trained)):
        results.add_scores(model, "heldout", {"oracle": {"mean": mean, "n": 10}, "clipscore": {"mean": 20.0, "n": 10}})
    results.add_win_rate("oracle", "heldout", WinRate(rate, rate - 0.1, rate + 0.1, n=10, wins=0, ties=0, losses=0))
    return results


@pytest.mark.parametrize("candidate, production, promote", [
    (evaluation(0.6, 0.7), None, True),
    (evaluation(0.6, 0.4), None, False),           # loses to the base model too often
    (evaluation(0.6, 0.7), evaluation(0.5, 0.6), True),
    (evaluation(0.6, 0.7), evaluation(0.6, 0.6), False),   # must beat production by min_improvement
    (evaluation(0.6, 0.7), evaluation(0.7, 0.8), False),
])
def test_promotion_decision(candidate, production, promote):
    decision, reason = shell.promotion_decision(candidate, production, "heldout", min_win_rate=0.5,
                                                min_improvement=0.01)
    assert decision is promote, reason


@pytest.mark.slow
def test_local_pipeline_registers_evaluates_and_promotes_only_a_better_candidate(toy_world, base_model, tmp_path):
    from sspo.pipelines.local import run_local

    registry_url = str(tmp_path / "registry")
    tiny = {"steps": 2, "batch_size": 2, "sample_steps": 2, "save_every": 2, "data_limit": 48,
            "eval_prompts": "toy:heldout", "eval_seeds": "0", "eval_sample_steps": 2}
    first = run_local(tmp_path / "first", {**tiny, "min_win_rate": 0.0}, registry=registry_url, model=base_model,
                      data=toy_world)
    assert first["promoted"] is True
    assert registry.list_versions(registry_url, "sspo") == ["1"]
    assert registry.list_aliases(registry_url, "sspo") == {"candidate": "1", "production": "1"}
    assert 0.0 <= first["metrics"]["models.trained.heldout.oracle.mean"] <= 1.0
    assert 0.0 <= first["metrics"]["win_rate.oracle.heldout.rate"] <= 1.0
    assert "oracle" in Path(first["report"]).read_text()
    assert not list((tmp_path / "first" / "kfp").glob("*/evaluate/production_evaluation/metrics.json"))
    exported = Path(registry.export_url(registry_url, "sspo", "1"))
    storage.verify_dir(exported)
    card = (exported / "README.md").read_text()
    assert "- production" in card and "samples/grid-heldout.png" in card

    # No candidate can beat production by more than the whole score range: the gate must keep version 1.
    argv = ["pipeline", "run-local", "--workdir", str(tmp_path / "second"), "--registry", registry_url,
            "--model", base_model, "--data", toy_world, "--param", "min_win_rate=0", "--param", "min_improvement=1.5"]
    for name, value in tiny.items():
        argv += ["--param", f"{name}={value}"]
    assert cli.main(argv) == 0
    assert registry.list_versions(registry_url, "sspo") == ["1", "2"]
    assert registry.list_aliases(registry_url, "sspo") == {"candidate": "2", "production": "1"}
    assert not Path(registry.export_url(registry_url, "sspo", "2")).exists()  # only a promoted version is exported
    evaluated = {path.parent.name: json.loads(path.read_text())["checkpoint"]
                 for path in (tmp_path / "second" / "kfp").glob("*/evaluate/*/metrics.json")}
    assert evaluated == {"evaluation": f"{registry_url}/sspo/versions/2",
                         "production_evaluation": f"{registry_url}/sspo/versions/1"}
    lineage = json.loads((Path(registry_url) / "sspo" / "versions" / "2" / registry.LINEAGE).read_text())
    assert lineage["metrics"]["final_step"] == 2
