"""Training data at scale: a seeded order of shards and windows, memory that does not grow with the dataset, and
remote data streamed through a bounded cache."""

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from s3server import BUCKET

from sspo import storage
from sspo.errors import SSPOError
from sspo.prepare import FORMAT
from sspo.run_store import RunStore, read_log
from sspo.train.data import SampleOrder, ShardDataset
from train_tools import TINY, flags, kill_between_checkpoints, sspo_command, train, without_timings

RESOLUTION = 32  # the toy model's


def synthetic_dataset(url: str, num_samples: int, shard_size: int, paired: bool = True) -> str:
    """A prepared dataset of random images with toy captions, published at `url` as `sspo prepare` publishes."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    with storage.staged_output(url) as (staging, extra):
        shards = []
        for number, start in enumerate(range(0, num_samples, shard_size)):
            count = min(shard_size, num_samples - start)
            tensors = {role: torch.from_numpy(rng.integers(0, 256, (count, 3, RESOLUTION, RESOLUTION), dtype=np.uint8))
                       for role in (("winner", "loser") if paired else ("winner",))}
            name = f"shard-{number:05d}"
            save_file(tensors, str(staging / f"{name}.safetensors"))
            captions = [{"caption": f"a red circle at the top left {start + i}"} for i in range(count)]
            (staging / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in captions))
            shards.append({"tensors": f"{name}.safetensors", "captions": f"{name}.jsonl", "num_samples": count,
                           "split_counts": {}})
        extra.update({"format": FORMAT, "resolution": RESOLUTION, "num_samples": num_samples, "paired": paired,
                      "shards": shards, "skipped": {}})
    return url


def test_an_epoch_is_a_permutation_read_window_by_window():
    sizes = np.array([5, 0, 7, 3, 9, 4])
    order = SampleOrder(sizes, seed=3, window=2)
    starts = order.starts
    for epoch in range(3):
        ids = order.ids(epoch * order.total, order.total)
        assert sorted(ids) == list(range(order.total))
        shard_of = np.searchsorted(starts, ids, side="right") - 1
        # consecutive windows of two (non-empty) shards: each run of positions comes from one window only
        windows, offsets = order.epoch(epoch)
        for window, (begin, end) in zip(windows, zip(offsets, offsets[1:])):
            assert set(shard_of[begin:end]) == set(window)
    assert order.ids(0, order.total) != order.ids(order.total, order.total)
    assert SampleOrder(sizes, seed=3, window=2).ids(5, 20) == order.ids(5, 20)  # from (seed, position) alone
    assert SampleOrder(sizes, seed=4, window=2).ids(0, 20) != order.ids(0, 20)
    whole = SampleOrder(sizes, seed=3, window=len(sizes))
    assert len(whole.epoch(0)[0]) == 1 and sorted(whole.ids(0, whole.total)) == list(range(whole.total))


def test_the_next_window_at_an_epochs_end_is_the_next_epochs_first():
    order = SampleOrder(np.array([4, 4, 4]), seed=0, window=2)
    windows, _ = order.epoch(0)
    assert order.next_window_shards(0) == list(windows[1])
    assert order.next_window_shards(order.total - 1) == list(order.epoch(1)[0][0])


def peak_rss_mb(cwd, *args: str) -> float:
    """Peak resident memory of `sspo ARGS` as a process of its own (its rusage, from wait4)."""
    process = subprocess.Popen([sys.executable, "-m", "sspo", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stderr.close()
    assert process.returncode == 0, stderr[-3000:]
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_memory_does_not_grow_with_the_dataset(base_model, tmp_path):
    """50,000 pairs (300 MB of images) train in the memory of 2,500: only the rows of each batch are read."""
    small = synthetic_dataset(str(tmp_path / "small"), 2_500, shard_size=1_024)
    large = synthetic_dataset(str(tmp_path / "large"), 50_000, shard_size=1_024)
    settings = {"model": base_model, **TINY, "objective": "dpo", "steps": 3, "save_every": 3, "threads": 1,
                "shuffle_shards": 4}
    small_mb = peak_rss_mb(tmp_path, "train", *flags({**settings, "data": small, "output": tmp_path / "run-small"}))
    large_mb = peak_rss_mb(tmp_path, "train", *flags({**settings, "data": large, "output": tmp_path / "run-large"}))
    print(f"peak RSS: 2,500 pairs {small_mb:.0f} MB, 50,000 pairs {large_mb:.0f} MB")
    assert large_mb - small_mb < 48, (small_mb, large_mb)


@pytest.fixture
def streamed(s3, tmp_path, monkeypatch):
    """A 640-pair dataset in 40 shards on the S3 server, and a private cache for the run."""
    monkeypatch.setenv("SSPO_CACHE", str(tmp_path / "cache"))
    return synthetic_dataset(f"s3://{BUCKET}/data-{uuid.uuid4().hex[:8]}", 640, shard_size=16)


SHARD_BYTES = 100_000  # 16 pairs of 32² images (98 kB) and their captions, rounded up
STREAMED = {"shuffle_shards": 2, "data_cache_gb": 5 * SHARD_BYTES / 2**30}  # two windows fit, three don't


def is_cached(tmp_path, data: ShardDataset, shard: int) -> bool:
    name = data.shards[shard]["tensors"]
    return (tmp_path / "cache" / "shards" / data.files.entry(name)["sha256"]).exists()


@pytest.mark.slow
def test_remote_data_is_streamed_through_a_bounded_cache(base_model, streamed, tmp_path):
    local = tmp_path / "local-copy"
    storage.download_dir(streamed, local)
    values = {**TINY, "objective": "dpo", "steps": 12, "save_every": 12, **STREAMED}
    train(base_model, str(local), tmp_path / "from-disk", **values)
    train(base_model, streamed, tmp_path / "streamed", **values)
    # 12 steps of 4 pairs read two windows of 32 pairs and fetch the third ahead: the first one's shards make room
    files = [p for p in (tmp_path / "cache" / "shards").iterdir() if not p.name.startswith(".")]
    assert sum(p.stat().st_size for p in files) <= STREAMED["data_cache_gb"] * 2**30
    data = ShardDataset(streamed, seed=0, shuffle_shards=2)
    windows = data.order.epoch(0)[0]
    assert not all(is_cached(tmp_path, data, shard) for shard in windows[0])
    assert all(is_cached(tmp_path, data, shard) for shard in [*windows[1], *windows[2]])
    assert without_timings(read_log(str(tmp_path / "streamed"))) == without_timings(
        read_log(str(tmp_path / "from-disk")))


@pytest.mark.slow
def test_a_streamed_run_resumes_bit_identical(base_model, streamed, tmp_path):
    values = {"model": base_model, "data": streamed, **TINY, "objective": "dpo", "steps": 8, "save_every": 4,
              **STREAMED}
    train(base_model, streamed, tmp_path / "straight",
          **{key: value for key, value in values.items() if key not in ("model", "data")})
    output = tmp_path / "resumed"
    store = RunStore(str(output))
    command = sspo_command("train", *flags({**values, "output": output}))
    kill_between_checkpoints(command, output / "train_log.jsonl", tmp_path,
                             lambda: store.latest_checkpoint() == store.checkpoint_url(4))
    resumed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timings(read_log(str(output))) == without_timings(read_log(str(tmp_path / "straight")))


def test_a_cache_too_small_for_two_windows_is_refused(streamed):
    with pytest.raises(SSPOError, match="cannot hold two windows"):
        ShardDataset(streamed, shuffle_shards=2, cache_bytes=3 * SHARD_BYTES)


def test_a_damaged_shard_is_refused_when_it_is_read(tmp_path):
    data = synthetic_dataset(str(tmp_path / "data"), 64, shard_size=32)
    shard = tmp_path / "data" / "shard-00001.safetensors"
    damaged = bytearray(shard.read_bytes())
    damaged[-1] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    dataset = ShardDataset(data)
    dataset.rows(range(32))  # the intact shard reads
    with pytest.raises(SSPOError, match="sha256"):
        dataset.rows([40])


def test_splits_joined_by_plus_train_on_the_samples_of_each(tmp_path):
    from sspo import config
    from sspo.stages import run_prepare, run_world

    run_world(config.load("world", None, {"output": str(tmp_path / "world"), "samples_per_scene": 2,
                                          "validation_split": True}))
    data = str(tmp_path / "prepared")
    run_prepare(config.load("prepare", None, {"source": str(tmp_path / "world"), "output": data}))
    sizes = {split: len(ShardDataset(data, split=split)) for split in ("train", "validation", "train+validation")}
    assert sizes == {"train": 72, "validation": 24, "train+validation": 96}
    both = ShardDataset(data, split="train+validation")
    assert {split for split in both.rows(list(range(96)))["splits"]} == {"train", "validation"}
    with pytest.raises(SSPOError, match="no samples with split 'test'"):
        ShardDataset(data, split="test")
