"""Training data read from prepared shards (sspo.prepare) in bounded memory, local or from object storage.

Sample order. Sample ids number the samples of the chosen split in manifest order. Each epoch permutes the shards,
takes them `shuffle_shards` at a time (a window) and permutes the samples within each window, so the sample at
global position p depends on (seed, p) alone: a resumed run reads what an uninterrupted one would, whatever the
number of processes (the trainer gives each process its own positions of one global sequence). A window as large
as the dataset is a full shuffle.

Memory. Shards are opened with safetensors' memory-mapped reader and only the rows of a batch are read; at most two
windows of shards are open. A remote dataset is streamed: shards are downloaded, checked against the manifest, into
a local cache bounded by `cache_bytes` (the current and the next window; the next one is fetched in the
background), so training starts once its first window is local. Every shard file is checked against its sha256
once per process before it is read.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from sspo import storage
from sspo.conditioning import uncropped_geometry
from sspo.errors import SSPOError
from sspo.prepare import FORMAT, to_unit_range
from sspo.train.replay import counter_rng

log = logging.getLogger(__name__)

# Tensors that `encode_with` adds to a shard, by the name `ShardDataset.batch` gives them.
ENCODED = {"latent_mean": "winner_latent_mean", "latent_logvar": "winner_latent_logvar",
           "loser_latent_mean": "loser_latent_mean", "loser_latent_logvar": "loser_latent_logvar",
           "prompt_hidden": "prompt_hidden", "prompt_pooled": "prompt_pooled"}


class SampleOrder:
    """Global position → sample id: per epoch, shards permuted, then samples permuted within windows of
    `window` consecutive shards of that permutation."""

    def __init__(self, sizes: np.ndarray, seed: int, window: int):
        self.sizes = sizes  # samples of each shard in the split
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # the first sample id of each shard
        self.total = int(self.starts[-1])
        self.seed, self.window = seed, window

    @functools.lru_cache(maxsize=2)  # a batch may straddle two epochs
    def epoch(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(the shards of each window, the first within-epoch offset of each window)."""
        shards = counter_rng(self.seed, 4, epoch).permutation(len(self.sizes))
        shards = shards[self.sizes[shards] > 0]  # shards without samples of the split
        windows = [shards[start:start + self.window] for start in range(0, len(shards), self.window)]
        offsets = np.cumsum([0] + [int(self.sizes[w].sum()) for w in windows])
        return windows, offsets

    @functools.lru_cache(maxsize=4)
    def window_order(self, epoch: int, window: int) -> np.ndarray:
        """The sample ids of one window in the order they are read."""
        shards = self.epoch(epoch)[0][window]
        ids = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in shards])
        # The first window keeps the key of the whole-dataset shuffle that came before windows: a dataset of one
        # shard is read in the same order as before.
        keys = (self.seed, 3, epoch, window) if window else (self.seed, 3, epoch)
        return ids[counter_rng(*keys).permutation(len(ids))]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, window) of a global position."""
        epoch, offset = divmod(position, self.total)
        return epoch, int(np.searchsorted(self.epoch(epoch)[1], offset, side="right")) - 1

    def ids(self, position: int, count: int) -> list[int]:
        """Sample ids of positions `position .. position+count`."""
        ids = []
        for p in range(position, position + count):
            epoch, window = self.locate(p)
            offset = p % self.total - self.epoch(epoch)[1][window]
            ids.append(int(self.window_order(epoch, window)[offset]))
        return ids

    def next_window_shards(self, position: int) -> list[int]:
        """The shards of the window after the one holding `position` (the next epoch's first at an epoch's end)."""
        epoch, window = self.locate(position)
        windows = self.epoch(epoch)[0]
        return list(windows[window + 1]) if window + 1 < len(windows) else list(self.epoch(epoch + 1)[0][0])


class OpenShard:
    """One shard's memory-mapped tensors plus its captions, splits and the rows of the chosen split."""

    def __init__(self, tensors: Path, captions: Path, num_samples: int, splits: set[str] | None, resolution: int,
                 where: str):
        self.tensors = safe_open(str(tensors), framework="pt")
        lines = [json.loads(line) for line in captions.read_text(encoding="utf-8").splitlines()]
        self.names = set(self.tensors.keys())
        if len(lines) != num_samples or self.tensors.get_slice("winner").get_shape()[0] != num_samples:
            raise SSPOError(f"{where}: its tensors and captions disagree on sample count")
        self.rows = np.array([row for row, line in enumerate(lines) if splits is None or line.get("split") in splits])
        self.captions = [line["caption"] for line in lines]
        self.splits = [line.get("split") for line in lines]
        # Datasets prepared before geometry was recorded hold uncropped images at the resolution.
        default = uncropped_geometry(num_samples, resolution).to(torch.int32)
        self.geometry = {role: self.tensors.get_tensor(f"{role}_geometry") if f"{role}_geometry" in self.names
                         else default
                         for role in ("winner", "loser")}

    def read(self, name: str, row: int) -> torch.Tensor:
        return self.tensors.get_slice(name)[row:row + 1]


class ShardFiles:
    """Local, verified paths of a dataset's files: in place for a local dataset; else downloaded into a cache of at
    most `cache_bytes`, named by sha256 (processes on one machine share it), least recently used evicted first."""

    def __init__(self, url: str, manifest: dict, cache_bytes: int):
        self.url, self.files = url, manifest["files"]
        self.local = storage.local_path(url) if storage.is_local(url) else None
        self.cache = storage.cache_root() / "shards"
        self.cache_bytes = cache_bytes
        self.verified: set[str] = set()
        self.used: OrderedDict[str, None] = OrderedDict()  # cached names, least recently used first
        self.lock = threading.Lock()

    def entry(self, name: str) -> dict:
        entry = self.files.get(name)
        if entry is None:
            raise SSPOError(f"{self.url}: {name} is not listed in its {storage.MANIFEST}")
        return entry

    def path(self, name: str) -> Path:
        """The local copy of `name`, checked against its sha256 (once per process)."""
        entry = self.entry(name)
        if self.local is not None:
            path = self.local / name
            if not path.exists():
                raise SSPOError(f"{self.url}: {name} is listed in its {storage.MANIFEST} but missing")
        else:
            path = self.cache / entry["sha256"]
            if not path.exists():
                self.download(name, path)
            with self.lock:
                self.used[name] = None
                self.used.move_to_end(name)
        with self.lock:
            checked = name in self.verified
        if not checked:
            if storage.sha256_file(path) != entry["sha256"]:
                if self.local is None:
                    path.unlink(missing_ok=True)  # downloaded again next time
                raise SSPOError(f"{storage.join(self.url, name)} does not match its sha256 in the manifest "
                                "(corrupt or tampered)")
            with self.lock:
                self.verified.add(name)
        return path

    def download(self, name: str, path: Path) -> None:
        self.evict(self.entry(name)["bytes"])
        fs, remote = storage.filesystem(storage.join(self.url, name))
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            storage.retry(lambda: fs.get_file(remote, str(partial)), f"downloading {storage.join(self.url, name)}")
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)

    def evict(self, incoming: int) -> None:
        """Remove least recently used cached shard files until `incoming` bytes fit the limit; the two open windows
        are never among them, since the limit is checked to hold them."""
        with self.lock:
            cached = [name for name in self.used if (self.cache / self.files[name]["sha256"]).exists()]
            size = sum(self.files[name]["bytes"] for name in cached)
            for name in cached:
                if size + incoming <= self.cache_bytes:
                    break
                (self.cache / self.files[name]["sha256"]).unlink(missing_ok=True)
                size -= self.files[name]["bytes"]
                del self.used[name]
                self.verified.discard(name)

    def is_cached(self, name: str) -> bool:
        return self.local is not None or (self.cache / self.entry(name)["sha256"]).exists()


class ShardDataset:
    """A prepared dataset read in bounded memory.

    With `encodings` (the default) the latent distributions and prompt embeddings of a dataset prepared with
    `encode_with` are served instead of the pixels they replace; `encoded_with` names the model that made them (None
    when the dataset has none, or they are not wanted).
    """

    def __init__(self, url: str, split: str | None = None, encodings: bool = True, *, seed: int = 0,
                 shuffle_shards: int = 64, cache_bytes: int = 64 << 30):
        manifest = self.read_manifest(url)
        self.url, self.split = url, split
        self.chosen_splits = None if split is None else set(split.split("+"))
        self.resolution: int = manifest["resolution"]
        self.paired: bool = manifest["paired"]
        self.encoded_with: dict | None = manifest.get("encoded_with") if encodings else None
        self.shards: list[dict] = manifest["shards"]
        self.files = ShardFiles(url, manifest, cache_bytes)
        sizes = np.array([self.split_count(i) for i in range(len(self.shards))], dtype=np.int64)
        if not sizes.sum():
            raise SSPOError(f"{url} has no samples with split {split!r} (splits present: "
                            f"{sorted(self.splits_present()) or 'none'})")
        self.order = SampleOrder(sizes, seed, shuffle_shards)
        window_bytes = sorted((self.shard_bytes(i) for i in range(len(self.shards))), reverse=True)[:shuffle_shards]
        if self.files.local is None and 2 * sum(window_bytes) > cache_bytes:
            raise SSPOError(f"the data cache ({cache_bytes / 2**30:.2f} GiB) cannot hold two windows of "
                            f"{shuffle_shards} shards of {url} ({2 * sum(window_bytes) / 2**30:.2f} GiB): raise "
                            "data_cache_gb or lower shuffle_shards")
        self.open: OrderedDict[int, OpenShard] = OrderedDict()
        self.max_open = 2 * shuffle_shards
        self.fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        self.prefetching: Future | None = None

    @staticmethod
    def read_manifest(url: str) -> dict:
        try:
            manifest = storage.read_json(storage.join(url, storage.MANIFEST))
        except FileNotFoundError:
            raise SSPOError(f"{url} has no {storage.MANIFEST}: it is not a prepared dataset, or it is incomplete")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise SSPOError(f"{url} is not a prepared dataset (format {found!r}, expected {FORMAT!r})")
        return manifest

    def split_count(self, shard: int) -> int:
        """Samples of the split in a shard, from the manifest; datasets prepared before it recorded the counts have
        their captions files read."""
        entry = self.shards[shard]
        if self.chosen_splits is None:
            return entry["num_samples"]
        if "split_counts" in entry:
            return sum(entry["split_counts"].get(split, 0) for split in self.chosen_splits)
        return sum(line.get("split") in self.chosen_splits for line in self.caption_lines(shard))

    def caption_lines(self, shard: int) -> list[dict]:
        text = self.files.path(self.shards[shard]["captions"]).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]

    def splits_present(self) -> set[str]:
        found = set()
        for shard, entry in enumerate(self.shards):
            counts = entry.get("split_counts")
            found |= set(counts) if counts is not None else {line.get("split") for line in self.caption_lines(shard)}
        return found - {None}

    def shard_bytes(self, shard: int) -> int:
        entry = self.shards[shard]
        return sum(self.files.entry(entry[key])["bytes"] for key in ("tensors", "captions"))

    def __len__(self) -> int:
        return self.order.total

    def shard(self, index: int) -> OpenShard:
        """The open shard `index`, opened (and, when remote, downloaded) if it is not."""
        if index in self.open:
            self.open.move_to_end(index)
            return self.open[index]
        entry = self.shards[index]
        opened = OpenShard(self.files.path(entry["tensors"]), self.files.path(entry["captions"]),
                           entry["num_samples"], self.chosen_splits, self.resolution, f"{self.url} {entry['tensors']}")
        if len(opened.rows) != self.order.sizes[index]:
            raise SSPOError(f"{self.url}: {entry['captions']} holds {len(opened.rows)} samples of split "
                            f"{self.split!r}, its manifest {self.order.sizes[index]}")
        self.open[index] = opened
        while len(self.open) > self.max_open:
            self.open.popitem(last=False)
        return opened

    def locate(self, sample: int) -> tuple[OpenShard, int]:
        """(open shard, row in it) of a sample id."""
        if not 0 <= sample < len(self):
            raise IndexError(f"sample {sample} of a dataset of {len(self)}")
        index = int(np.searchsorted(self.order.starts, sample, side="right")) - 1
        opened = self.shard(index)
        return opened, int(opened.rows[sample - self.order.starts[index]])

    def prefetch(self, position: int) -> None:
        """Download the next window's shards in the background (remote datasets), one window at a time."""
        if self.files.local is not None or (self.prefetching is not None and not self.prefetching.done()):
            return
        if self.prefetching is not None:
            self.prefetching.result()  # a failed download stops the run here
        names = [self.shards[i][key] for i in self.order.next_window_shards(position)
                 for key in ("tensors", "captions")]
        missing = [name for name in names if not self.files.is_cached(name)]
        if missing:
            self.prefetching = self.fetcher.submit(lambda: [self.files.path(name) for name in missing])

    def ids_at(self, position: int, count: int) -> list[int]:
        """Sample ids at global positions `position .. position+count` of the seeded order."""
        return self.order.ids(position, count)

    def batch_at(self, position: int, count: int) -> dict:
        """The batch of global positions `position .. position+count`, with its sample ids as "ids"."""
        ids = self.ids_at(position, count)
        batch = self.batch(ids)
        self.prefetch(position)
        return {**batch, "ids": ids}

    def rows(self, ids, served_images: bool = True) -> dict:
        """The stored samples: uint8 images (B, 3, R, R) of the roles the dataset holds ("winner", "loser"), each
        image's geometry ("geometry", "loser_geometry": original height, original width, crop top, crop left),
        "captions", "splits", and the served encodings the samples hold. Without `served_images`, images whose
        latent distribution is served are not read."""
        located = [self.locate(int(i)) for i in ids]
        rows: dict = {"captions": [shard.captions[row] for shard, row in located],
                      "splits": [shard.splits[row] for shard, row in located]}
        if self.encoded_with is not None:
            for key, name in ENCODED.items():
                if all(name in shard.names for shard, _ in located):
                    rows[key] = torch.cat([shard.read(name, row) for shard, row in located])
        for role, prefix in (("winner", ""), ("loser", "loser_")) if self.paired else (("winner", ""),):
            if served_images or not {f"{prefix}latent_mean", f"{prefix}latent_logvar"} <= rows.keys():
                rows[role] = torch.cat([shard.read(role, row) for shard, row in located])
            rows[f"{prefix}geometry"] = torch.stack([shard.geometry[role][row] for shard, row in located])
        return rows

    def batch(self, ids) -> dict:
        """A training batch: pixels scaled to [-1, 1] as float32 (B, 3, R, R) and the losers' ("pixels",
        "loser_pixels"), captions, each image's geometry, and the served encodings (latent_mean, latent_logvar,
        loser_latent_mean, loser_latent_logvar, prompt_hidden, prompt_pooled). Images whose latent distribution is
        served are not read."""
        rows = self.rows(ids, served_images=False)
        batch = {key: rows[key] for key in ("captions", "geometry", *ENCODED) if key in rows}
        batch["loser_geometry"] = rows.get("loser_geometry")
        for role, key in (("winner", "pixels"), ("loser", "loser_pixels")):
            if role in rows:
                batch[key] = to_unit_range(rows[role])
        return batch

    def close(self) -> None:
        self.fetcher.shutdown(wait=True, cancel_futures=True)
        self.open.clear()
