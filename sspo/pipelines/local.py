"""`sspo pipeline run-local`: the whole pipeline under kfp.local, each step a subprocess in this Python environment.

World and bootstrap are toy-only set-up, done here before the pipeline (with the budgets the caller gives) unless a
dataset and a base model are passed in.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from sspo import config, storage
from sspo.errors import SSPOError


def _ensure(url: str, build) -> str:
    if not storage.is_published(url):
        build()
    return url


def run_local(workdir: Path, arguments: dict, *, registry: str | None = None, model: str | None = None,
              data: str | None = None, world_samples: int = 4, bootstrap_steps: int = 30) -> dict:
    from kfp import local

    from sspo.stages import run_bootstrap, run_world
    from sspo.pipelines.pipeline import sspo_pipeline

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = _ensure(str(workdir / "world"), lambda: run_world(config.load(
            "world", None, {"output": str(workdir / "world"), "samples_per_scene": world_samples})))
    if model is None:
        model = _ensure(str(workdir / "base"), lambda: run_bootstrap(config.load(
            "bootstrap", None, {"world": data, "output": str(workdir / "base"), "vae_steps": bootstrap_steps,
                                "unet_steps": bootstrap_steps})))
    # Steps run on this machine: training on its CPU unless gpus_per_node says otherwise.
    arguments = {"model_uri": model, "data_uri": data, "registry_url": registry or str(workdir / "registry"),
                 "gpus_per_node": 0, **arguments}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"))
    with warnings.catch_warnings():
        # kfp.local warns that the components name a non-Python image: running them here is the point.
        warnings.filterwarnings("ignore", message=".*base image.*", category=RuntimeWarning)
        try:
            outputs = sspo_pipeline(**arguments).outputs
        except RuntimeError as err:
            raise SSPOError(f"the local pipeline run failed ({' '.join(str(err).split())}); its log is above") \
                from None
    return {
        "promoted": outputs["promoted"],
        "metrics": dict(outputs["metrics"].metadata),
        "report": outputs["report"].uri,
        "registry": arguments["registry_url"],
    }
