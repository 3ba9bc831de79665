"""The image the pipeline steps run in: the Dockerfile installs the tested versions, offline, as a non-root user.
No container engine runs here, so the Dockerfile is checked as text against constraints.txt and the pipeline."""

import re
from pathlib import Path

import pytest

import sspo
from sspo.pipelines import IMAGE

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "components" / "Dockerfile"


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


def test_torch_is_the_pinned_release_installed_first():
    pinned = constraint("torch").split("+")[0]  # constraints.txt names the CPU build's local label
    assert build_arg_default("TORCH_VERSION") == pinned
    runs = args_of("RUN")
    torch_run = next(i for i, run in enumerate(runs) if 'pip install "torch==${TORCH_VERSION}"' in run)
    package_run = next(i for i, run in enumerate(runs) if '".[pipelines]"' in run)
    assert torch_run < package_run


def test_package_installs_with_the_constraints_file():
    (install,) = [run for run in args_of("RUN") if '".[pipelines]"' in run]
    assert re.search(r"pip install -c constraints\.txt \"\.\[pipelines\]\"", install)
    assert "pip check" in install
    copied = " ".join(args_of("COPY"))
    assert "constraints.txt" in copied and "pyproject.toml" in copied


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
    assert f"sspo:{sspo.__version__}" in (ROOT / "components" / "Dockerfile").read_text()
