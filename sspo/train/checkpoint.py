"""Checkpoint files: weights and optimizer tensors as safetensors, everything else as JSON. No pickle.

A checkpoint folder holds
- unet.safetensors        the trained weights (whole UNet, or the LoRA adapter): the replay pool entry
- checkpoint.json         what those weights are (kind, LoRA shape, step, base model, objective)
- optimizer.safetensors   optimizer state tensors
- training_state.json     step, optimizer hyper-parameters, LR schedule position, replay pool
- manifest.json           sha256 of every file, written last by storage.publish_dir
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sspo import faults, storage
from sspo.run_store import CHECKPOINT_INFO, CHECKPOINT_WEIGHTS

OPTIMIZER_TENSORS = "optimizer.safetensors"
TRAINING_STATE = "training_state.json"


def write_checkpoint(
    directory: Path, weights: dict, info: dict, optimizer_state: dict, training_state: dict
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    storage.save_tensors({k: v.detach().cpu().contiguous() for k, v in weights.items()}, directory / CHECKPOINT_WEIGHTS)
    (directory / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    faults.point("checkpoint-weights-written")  # a crash mid-write, for the fault tests
    tensors, scalars = {}, {}
    for param_id, values in optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    storage.save_tensors(tensors, directory / OPTIMIZER_TENSORS)
    state = {**training_state, "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars}}
    (directory / TRAINING_STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


def read_training_state(directory: Path) -> tuple[dict, dict]:
    """(training_state, optimizer_state_dict) of a checkpoint written by write_checkpoint."""
    state = json.loads((directory / TRAINING_STATE).read_text())
    optimizer = state.pop("optimizer")
    per_param: dict[int, dict] = {}
    for key, value in [*load_file(str(directory / OPTIMIZER_TENSORS)).items(), *optimizer["scalars"].items()]:
        param_id, name = key.split(".", 1)
        per_param.setdefault(int(param_id), {})[name] = value
    return state, {"state": per_param, "param_groups": optimizer["param_groups"]}
