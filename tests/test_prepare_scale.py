"""Prepare at scale: worker processes, a source split into parts that are published on their own and merged, the
Hugging Face Pick-a-Pic layout on object storage, and the pipeline's fan-out under kfp.local."""

import io
import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from failure_tools import assert_one_line_error
from s3server import BUCKET
from sspo import storage
from sspo.errors import SSPOError
from sspo.prepare import parquet_split, prepare

R = 8
# Pick-a-Pic v2's columns (yuvalkirstain/pickapic_v2): prepare reads caption, jpg_0, jpg_1 and label_0.
PICK_A_PIC_TYPES = {
    "are_different": pa.bool_(), "best_image_uid": pa.string(), "caption": pa.string(),
    "created_at": pa.timestamp("ns"), "has_label": pa.bool_(), "image_0_uid": pa.string(),
    "image_0_url": pa.string(), "image_1_uid": pa.string(), "image_1_url": pa.string(), "jpg_0": pa.binary(),
    "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(), "model_0": pa.string(),
    "model_1": pa.string(), "ranking_id": pa.int64(), "user_id": pa.int64(), "num_example_per_prompt": pa.int64(),
}


def noise_image(rng: random.Random, image_format: str) -> bytes:
    size = (rng.randint(9, 40), rng.randint(9, 40))
    image = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def pick_a_pic_rows(seed: int, count: int) -> list[dict]:
    """Rows as Pick-a-Pic holds them, with the odd bad one: a tie, a corrupt image, an empty caption, no label."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = rng.choice([0.0, 1.0, 1.0, 0.5]) if i % 7 else None
        jpg_0 = noise_image(rng, rng.choice(["PNG", "JPEG"]))
        jpg_1 = noise_image(rng, "JPEG")[: (30 if i % 11 == 5 else None)]
        rows.append({
            "are_different": True, "best_image_uid": str(uuid.UUID(int=rng.getrandbits(128))),
            "caption": "" if i % 13 == 4 else f"prompt {seed}-{i}", "created_at": None, "has_label": label is not None,
            "image_0_uid": "a", "image_0_url": "https://example.org/a.png", "image_1_uid": "b",
            "image_1_url": "https://example.org/b.png", "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label,
            "label_1": None if label is None else 1.0 - label, "model_0": "sdxl", "model_1": "sd-1.5",
            "ranking_id": i, "user_id": 7, "num_example_per_prompt": 1,
        })
    return rows


def parquet_bytes(rows: list[dict]) -> bytes:
    table = pa.table({name: pa.array([row[name] for row in rows], type=kind)
                      for name, kind in PICK_A_PIC_TYPES.items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# The file names of the dataset's `data/` folder on the Hugging Face hub.
PICK_A_PIC_FILES = {
    "data/train-00000-of-00002-0d3a4f5b6c7d8e9f.parquet": (1, 40),
    "data/train-00001-of-00002-1a2b3c4d5e6f7a8b.parquet": (2, 30),
    "data/validation_unique-00000-of-00001-9f8e7d6c5b4a3b2c.parquet": (3, 20),
}


def write_pick_a_pic(root: Path) -> Path:
    for name, (seed, count) in PICK_A_PIC_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(parquet_bytes(pick_a_pic_rows(seed, count)))
    return root


def dataset_contents(directory: Path) -> tuple[list, list]:
    """(every sample's caption line, every shard's tensors) of a prepared dataset, in manifest order."""
    manifest = storage.verify_dir(directory)
    lines, tensors = [], []
    for shard in manifest["shards"]:
        lines += (directory / shard["captions"]).read_text().splitlines()
        tensors.append(load_file(str(directory / shard["tensors"])))
    return lines, tensors


def without_publish_id(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key != "publish_id"}


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pick_a_pic(tmp_path_factory) -> Path:
    return write_pick_a_pic(tmp_path_factory.mktemp("pickapic"))


@pytest.mark.parametrize("options", [{"keep_pairs": True}, {"limit": 23}])
def test_two_workers_write_exactly_what_one_writes(pick_a_pic, tmp_path, options):
    one, two = tmp_path / "one", tmp_path / "two"
    summary = prepare(str(pick_a_pic), str(one), resolution=R, shard_size=9, **options)
    assert prepare(str(pick_a_pic), str(two), resolution=R, shard_size=9, workers=2, **options) == summary
    assert summary["skipped"] and summary["num_samples"] == options.get("limit", summary["num_samples"])
    assert without_publish_id(read_manifest(one)) == without_publish_id(read_manifest(two))
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())


def test_with_on_error_fail_two_workers_stop_at_the_same_sample(pick_a_pic, tmp_path):
    messages = []
    for workers in (1, 2):
        with pytest.raises(SSPOError) as raised:
            prepare(str(pick_a_pic), str(tmp_path / f"out{workers}"), resolution=R, on_error="fail", workers=workers)
        messages.append(str(raised.value))
        assert not (tmp_path / f"out{workers}").exists()
    assert messages[0] == messages[1] and messages[0].startswith("bad sample ")


def test_pick_a_pic_layout_on_s3_keeps_the_splits_of_the_file_names(s3, pick_a_pic, tmp_path):
    prefix = f"s3://{BUCKET}/pickapic-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem(prefix)
    fs.put(str(pick_a_pic) + "/", prefix.removeprefix("s3://"), recursive=True)
    summary = prepare(prefix, str(tmp_path / "out"), resolution=R, keep_pairs=True, shard_size=16)
    assert summary["source_format"] == "parquet"
    lines, _ = dataset_contents(tmp_path / "out")
    splits = [json.loads(line)["split"] for line in lines]
    assert splits == sorted(splits, key=["train", "validation_unique"].index)  # files in order, train first
    counted = {}
    for shard in summary["shards"]:
        for split, count in shard["split_counts"].items():
            counted[split] = counted.get(split, 0) + count
        assert sum(shard["split_counts"].values()) == shard["num_samples"]
    assert counted == {split: splits.count(split) for split in set(splits)}
    assert set(counted) == {"train", "validation_unique"}


@pytest.mark.parametrize("path, split", [
    ("root/data/train-00000-of-00645-387db523fa7e7121.parquet", "train"),
    ("root/data/test_unique-00003-of-00014.parquet", "test_unique"),
    ("root/validation/0000.parquet", "validation"),
    ("root/test.parquet", "test"),
    ("root/train/more/part-7.parquet", "train"),
    ("root/pairs.parquet", None),
    ("root/data/0000.parquet", None),
])
def test_the_split_comes_from_the_file_name_or_a_split_folder(path, split):
    assert parquet_split("root", path) == split


def test_a_source_without_splits_counts_none(tmp_path):
    source = tmp_path / "folder"
    source.mkdir()
    for name in ("a", "b"):
        (source / f"{name}.png").write_bytes(noise_image(random.Random(name), "PNG"))
        (source / f"{name}.txt").write_text(f"a {name}")
    summary = prepare(str(source), str(tmp_path / "out"), resolution=R)
    assert [shard["split_counts"] for shard in summary["shards"]] == [{}]


def sspo_prepare(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sspo", "prepare", "--params", "", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_a_part_killed_midway_is_made_again_alone_and_the_parts_merge_into_the_whole(pick_a_pic, tmp_path):
    output = tmp_path / "parted"
    common = ["--source", str(pick_a_pic), "--output", str(output), "--resolution", str(R), "--keep-pairs",
              "--parts", "3", "--shard-size", "8"]
    for part in ("0", "2"):
        assert sspo_prepare(*common, "--part", part).returncode == 0
    # Killed with every shard of part 1 in place and its manifest not yet written.
    killed = sspo_prepare(*common, "--part", "1", env={"SSPO_FAULT": "publish-manifest-next"})
    assert killed.returncode == -9
    parts = output / "parts"
    assert (parts / "part-00001-of-00003").is_dir() and not (parts / "part-00001-of-00003/manifest.json").exists()
    published = {k: read_manifest(parts / f"part-0000{k}-of-00003") for k in (0, 2)}

    merged = sspo_prepare(*common)
    assert merged.returncode == 0, merged.stderr
    assert "part 0 of 3 is already published" in merged.stderr and "part 2 of 3 is already published" in merged.stderr
    assert "prepared part 1 of 3" in merged.stderr and "prepared part 0" not in merged.stderr
    assert {k: read_manifest(parts / f"part-0000{k}-of-00003") for k in (0, 2)} == published

    # One dataset, in source order: the same samples as one prepare of the whole source.
    whole = tmp_path / "whole"
    prepare(str(pick_a_pic), str(whole), resolution=R, keep_pairs=True, shard_size=8)
    manifest = read_manifest(output)
    assert manifest["parts"] == 3 and manifest["num_samples"] == read_manifest(whole)["num_samples"]
    assert manifest["skipped"] == read_manifest(whole)["skipped"]
    assert {shard["tensors"].split("/")[1] for shard in manifest["shards"]} == {
        f"part-0000{k}-of-00003" for k in range(3)}
    for shard in manifest["shards"]:
        part = shard["tensors"].split("/")[1]
        recorded = read_manifest(parts / part)["files"]
        assert manifest["files"][shard["tensors"]] == recorded[shard["tensors"].split("/")[-1]]
        assert set(shard["split_counts"]) <= {"train", "validation_unique"}
    lines, tensors = dataset_contents(output)
    whole_lines, whole_tensors = dataset_contents(whole)
    assert lines == whole_lines
    for role in ("winner", "loser", "winner_geometry"):
        assert torch.equal(torch.cat([t[role] for t in tensors]), torch.cat([t[role] for t in whole_tensors]))

    again = sspo_prepare(*common, "--merge")  # merging again the same parts changes nothing
    assert again.returncode == 0, again.stderr
    assert read_manifest(output) == manifest


def test_parts_made_differently_are_not_merged(pick_a_pic, tmp_path):
    output = str(tmp_path / "mixed")
    prepare(str(pick_a_pic), output, resolution=R, parts=2, part=0)
    with pytest.raises(SSPOError, match=r"part\(s\) 1 of 2 are not published"):
        prepare(str(pick_a_pic), output, parts=2, merge=True)
    prepare(str(pick_a_pic), output, resolution=2 * R, parts=2, part=1)
    with pytest.raises(SSPOError, match=r"its parts differ in resolution \(16, 8\)"):
        prepare(str(pick_a_pic), output, parts=2, merge=True)
    with pytest.raises(SSPOError, match=r"part-00000-of-00002 was made with other settings \(resolution\)"):
        prepare(str(pick_a_pic), output, resolution=2 * R, parts=2)


def test_parts_of_a_folder_and_bad_part_options(tmp_path, capsys):
    source = tmp_path / "folder"
    source.mkdir()
    for name in "abcde":
        (source / f"{name}.png").write_bytes(noise_image(random.Random(name), "PNG"))
        (source / f"{name}.txt").write_text(f"a {name}")
    summary = prepare(str(source), str(tmp_path / "out"), resolution=R, parts=9)  # no more parts than images
    assert summary["parts"] == 5 and summary["built_parts"] == [0, 1, 2, 3, 4] and summary["num_samples"] == 5
    with pytest.raises(SSPOError, match="part 5 does not exist: .* has 5 images or clips, so it makes 5 part"):
        prepare(str(source), str(tmp_path / "out2"), parts=9, part=5)
    result = sspo_prepare("--source", str(source), "--output", str(tmp_path / "out3"), "--parts", "2", "--limit", "3")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "prepare", "limit caps the whole dataset")


@pytest.mark.slow  # five steps, each a fresh interpreter
def test_the_pipeline_prepares_three_parts_side_by_side_and_merges_them(s3, pick_a_pic, tmp_path):
    import warnings

    from kfp import dsl, local

    from sspo.pipelines import pipeline

    prefix = f"s3://{BUCKET}/pickapic-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem(prefix)
    fs.put(str(pick_a_pic) + "/", prefix.removeprefix("s3://"), recursive=True)

    @dsl.pipeline
    def prepare_only(data_uri: str, data_parts: int):
        pipeline.prepare_dataset(data_uri, "auto", R, 0, data_parts, 0, "", False)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base image.*", category=RuntimeWarning)
        prepare_only(data_uri=prefix, data_parts=3)
    (dataset,) = (tmp_path / "kfp").glob("*/list-parts/prepared")
    manifest = storage.verify_dir(dataset)
    assert manifest["parts"] == 3 and manifest["source"] == prefix
    assert sorted(p.name for p in (dataset / "parts").iterdir()) == [f"part-0000{k}-of-00003" for k in range(3)]
    whole = prepare(prefix, str(tmp_path / "whole"), resolution=R)
    assert dataset_contents(dataset)[0] == dataset_contents(tmp_path / "whole")[0]
    assert manifest["num_samples"] == whole["num_samples"]
