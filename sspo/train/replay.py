"""Random Checkpoint Replay: the pool of earlier checkpoints and the reference model drawn from it.

The pool starts with θ₀ (the base model) and gains a checkpoint every `save_every` steps. Each micro-batch draws one
entry; that entry is the frozen reference of the loss and the generator of the self-samples.

- LoRA: an entry is a small adapter; switching copies it into a frozen "reference" adapter on the same UNet, and
  θ₀ is the UNet with adapters disabled.
- Full fine-tune: an entry is a whole UNet; a bounded host-RAM LRU cache backed by the checkpoint files holds
  recent entries, and the next step's entry is loaded in a background thread while the current step runs.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

BASE = "base"


def counter_rng(*keys: int) -> np.random.Generator:
    """A generator fixed by its keys alone, so a resumed run draws exactly what an uninterrupted one would."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def draw_index(distribution: str, pool_size: int, seed: int, step: int, slot: int) -> int:
    if distribution == "initial":
        return 0
    if distribution == "latest":
        return pool_size - 1
    return int(counter_rng(seed, 7, step, slot).integers(pool_size))


class LoraReference:
    """Reference = the policy UNet with a frozen second adapter, or with adapters off for θ₀."""

    def __init__(self, unet, lora_config, load_weights):
        self.unet = unet
        self.load_weights = load_weights
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        self.current: str | None = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # a second adapter is meant
            unet.add_adapter(lora_config, adapter_name="reference")
        unet.set_adapter("default")

    def prefetch(self, entry: str) -> None:
        """Adapters are small: every entry stays in memory once loaded."""

    def activate(self, entry: str) -> None:
        if entry != BASE and entry != self.current:
            if entry not in self.entries:
                self.entries[entry] = self.load_weights(entry)
            set_peft_model_state_dict(self.unet, self.entries[entry], adapter_name="reference")
        self.current = entry

    def close(self) -> None:
        """Adapters load in the training thread: nothing to stop."""

    @contextlib.contextmanager
    def model(self):
        """The UNet acting as the reference; restores the trainable adapter afterwards."""
        if self.current == BASE:
            self.unet.disable_adapters()
        else:
            self.unet.set_adapter("reference")
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()
            self.unet.set_adapter("default")


class FullReference:
    """Reference = a second frozen UNet whose weights are swapped in from a host-RAM LRU cache."""

    def __init__(self, reference_unet, cache_size: int, load_weights):
        self.reference_unet = reference_unet.requires_grad_(False).eval()
        self.cache_size = cache_size
        self.load_weights = load_weights
        self.cache: OrderedDict[str, dict[str, torch.Tensor] | Future] = OrderedDict()
        self.lock = threading.Lock()
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-prefetch")
        self.current: str | None = None

    def _cached(self, entry: str):
        with self.lock:
            if entry not in self.cache:
                self.cache[entry] = self.loader.submit(self.load_weights, entry)
            self.cache.move_to_end(entry)
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
            return self.cache[entry]

    def prefetch(self, entry: str) -> None:
        self._cached(entry)

    def activate(self, entry: str) -> None:
        if entry == self.current:
            return
        weights = self._cached(entry)
        if isinstance(weights, Future):
            weights = weights.result()
            with self.lock:
                if entry in self.cache:
                    self.cache[entry] = weights
        self.reference_unet.load_state_dict(weights)
        self.current = entry

    @contextlib.contextmanager
    def model(self):
        yield self.reference_unet

    def close(self) -> None:
        self.loader.shutdown(wait=True)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
