"""The image the pipeline steps run in: the Dockerfile installs the tested versions, offline, as a non-root user, in
layers that a code change does not rebuild. `make image-test` builds and runs it with podman; here, without a
container engine, the Dockerfile is checked as text and its shell steps run on this machine."""

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sspo
from sspo.pipelines import IMAGE

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "components" / "Dockerfile"
IGNORE_FILE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def args_of(name: str) -> list[str]:
    return [arguments for instruction, arguments in instructions() if instruction == name]


def constraint(package: str) -> str:
    (line,) = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
               if line.lower().startswith(package + "==")]
    return line.split("==", 1)[1]


def build_arg_default(name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in args_of("ARG") if arg.startswith(name + "=")]
    return value


def run_step(containing: str) -> str:
    """The one RUN instruction containing `containing`."""
    (step,) = [run for run in args_of("RUN") if containing in run]
    return step


def command_of(step: str, starting: str) -> str:
    """The command of a RUN step's `&&` chain that starts with `starting`."""
    (command,) = [part.strip() for part in step.split(" && ") if part.strip().startswith(starting)]
    return command


def shell(command: str, folder: Path, **env) -> subprocess.CompletedProcess:
    """`command` through sh in `folder`, with this Python first on PATH as `python` (as in the image)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["sh", "-c", command], cwd=folder, env={**os.environ, "PATH": path, **env},
                          capture_output=True, text=True)


def layer(containing: str) -> int:
    """Index, among all instructions, of the first one containing `containing`."""
    return next(i for i, (_, arguments) in enumerate(instructions()) if containing in arguments)


def test_torch_pin_keeps_the_release_and_takes_the_image_variant(tmp_path):
    rewrite = command_of(run_step("torch.version.cuda is None"), "sed")
    release = constraint("torch").split("+")[0]
    for variant, pin in (("cpu", f"torch=={release}+cpu"), ("cu130", f"torch=={release}+cu130"),
                         ("", f"torch=={release}")):
        shutil.copy(ROOT / "constraints.txt", tmp_path)
        assert shell(rewrite, tmp_path, TORCH_VARIANT=variant).returncode == 0
        assert [line for line in (tmp_path / "constraints.txt").read_text().splitlines()
                if line.startswith("torch==")] == [pin]
    assert constraint("torch").endswith("+" + build_arg_default("TORCH_VARIANT"))  # the default build is the tested one
    assert build_arg_default("TORCH_INDEX") == "https://download.pytorch.org/whl/${TORCH_VARIANT}"


def test_torch_installs_with_the_constraints_and_the_variant_is_checked(tmp_path):
    step = run_step("torch.version.cuda is None")
    assert re.search(r"pip install -c constraints\.txt .*\btorch$", command_of(step, "pip install"))
    check = command_of(step, "python -c")
    import torch

    # this machine's torch is the CPU build: the check passes for a CPU image and stops a CUDA one
    assert torch.version.cuda is None
    assert shell(check, tmp_path, TORCH_VARIANT="cpu").returncode == 0
    for variant in ("cu130", ""):
        failed = shell(check, tmp_path, TORCH_VARIANT=variant)
        assert failed.returncode != 0 and f"is not the {variant} build" in failed.stderr


def test_dependencies_install_from_pyproject_before_the_code_is_copied(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    step = run_step("requirements.txt")
    listing = command_of(step, "python -c")
    assert shell(listing, tmp_path).returncode == 0
    requirements = (tmp_path / "requirements.txt").read_text().split()
    for requirement in ("torch>=2.4", "diffusers>=0.35", "kfp>=2.14", "kfp-kubernetes>=2.14", "setuptools>=77"):
        assert requirement in requirements
    assert command_of(step, "pip install") == "pip install -c constraints.txt -r requirements.txt"


def test_code_is_copied_last_and_installed_without_dependencies():
    copies = args_of("COPY")
    assert copies[-1] == "sspo ./sspo"
    code = layer("sspo ./sspo")
    assert layer("torch.version.cuda is None") < layer("requirements.txt") < code
    (last_install,) = [run for run in args_of("RUN") if "pip install --no-deps" in run]
    assert args_of("RUN")[-1] == last_install
    assert command_of(last_install, "pip install") == "pip install --no-deps --no-build-isolation ."
    assert "pip check" in last_install
    # setuptools' in-tree build output must not reach the layer
    assert "rm -rf build sspo.egg-info" in last_install


def test_ignore_file_lets_in_only_what_the_dockerfile_copies():
    patterns = [line.strip() for line in IGNORE_FILE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = {source.rstrip("/") for copy in args_of("COPY") for source in copy.split()[:-1]}
    assert allowed == copied
    assert "**/__pycache__" in patterns[patterns.index("!sspo/"):]
    assert not (ROOT / "components" / "Dockerfile.dockerignore").exists()  # BuildKit-only: podman ignores it


@pytest.mark.parametrize("package", ["kfp", "kfp-kubernetes", "diffusers", "transformers"])
def test_packages_the_components_need_are_pinned(package):
    assert re.fullmatch(r"\d+(\.\d+)+", constraint(package))


def test_runs_offline_as_a_non_root_user_with_sspo_as_entrypoint():
    env = " ".join(args_of("ENV"))
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    users = args_of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert args_of("ENTRYPOINT") == ['["sspo"]']


def test_base_python_satisfies_the_package():
    (base,) = args_of("FROM")
    version = tuple(int(part) for part in re.match(r"python:(\d+)\.(\d+)", base).groups())
    required = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text()).groups()
    assert version >= tuple(int(part) for part in required)


def test_pipeline_image_is_tagged_with_the_package_version():
    assert IMAGE.rsplit(":", 1)[1] == sspo.__version__
    assert f"sspo:{sspo.__version__}" in DOCKERFILE.read_text()


def test_image_test_fills_the_executor_input_the_way_the_launcher_does(tmp_path):
    """tools/image-test runs exec-prepare as a pod; the executor input it builds must be a valid ExecutorInput."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    loader = importlib.machinery.SourceFileLoader("image_test", str(ROOT / "tools" / "image-test"))
    image_test = importlib.util.module_from_spec(importlib.util.spec_from_loader("image_test", loader))
    loader.exec_module(image_test)
    result = subprocess.run([sys.executable, "-c", image_test.POD_SPEC, str(ROOT / "pipelines" / "sspo_pipeline.yaml"),
                             "exec-prepare", "/work/prepare", json.dumps(image_test.PREPARE_VALUES)],
                            capture_output=True, text=True, check=True)
    pod = json.loads(result.stdout)
    assert pod["command"][:2] == ["sh", "-ec"]
    executor_input = json_format.Parse(pod["args"][pod["args"].index("--executor_input") + 1],
                                       pipeline_spec_pb2.ExecutorInput())
    artifacts = {**executor_input.inputs.artifacts, **executor_input.outputs.artifacts}
    assert artifacts["prepared"].artifacts[0].uri == "/work/prepare/prepared"
    assert executor_input.outputs.output_file == "/work/prepare/executor_output.json"
    assert executor_input.inputs.parameter_values["limit"].number_value == 8

    wrong = subprocess.run([sys.executable, "-c", image_test.POD_SPEC, str(ROOT / "pipelines" / "sspo_pipeline.yaml"),
                            "exec-prepare", "/work/prepare", json.dumps({"source": "/work/world"})],
                           capture_output=True, text=True)
    assert wrong.returncode != 0 and "exec-prepare needs values for" in wrong.stderr
