import io
import json
import logging
import math
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from failure_tools import assert_nothing_published, assert_one_line_error, needs_root, sspo_on_full_disk
from sspo.cli import main
from sspo.decoding import to_pixels
from sspo.errors import SSPOError
from sspo.prepare import prepare
from sspo.train.data import ShardDataset

R = 8
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
# JPEG and WEBP are lossy even on flat colours.
LOSSY_TOLERANCE = 12


def read_dataset(url: str, split: str | None = None) -> SimpleNamespace:
    """Every sample of a prepared dataset as the trainer's reader serves them."""
    data = ShardDataset(url, split=split)
    rows = data.rows(range(len(data)))
    return SimpleNamespace(captions=rows["captions"], splits=rows["splits"], winners=rows["winner"],
                           losers=rows.get("loser"))


def encode(color, image_format="PNG", size=(20, 14)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=image_format)
    return buffer.getvalue()


def truncated_png() -> bytes:
    return encode(GREEN)[:40]


def assert_color(pixels: torch.Tensor, color, tolerance=LOSSY_TOLERANCE):
    """`pixels` is one uint8 (3, R, R) image that should be the flat `color`."""
    assert pixels.shape == (3, R, R) and pixels.dtype == torch.uint8
    expected = torch.tensor(color, dtype=torch.int16).view(3, 1, 1)
    assert (pixels.to(torch.int16) - expected).abs().max() <= tolerance


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def write_parquet(path, rows, names=("caption", "jpg_0", "jpg_1", "label_0")):
    columns = list(zip(*rows))
    types = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64()}
    table = pa.table({name: pa.array(column, type=types[name]) for name, column in zip(names, columns)})
    pq.write_table(table, path)


def read_manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture
def folder_source(tmp_path):
    source = tmp_path / "folder"
    source.mkdir()
    for stem, color, image_format, extension in [
        ("a", RED, "PNG", "png"),
        ("b", GREEN, "JPEG", "jpg"),
        ("c", BLUE, "WEBP", "webp"),
        ("d", YELLOW, "BMP", "bmp"),
    ]:
        (source / f"{stem}.{extension}").write_bytes(encode(color, image_format))
        (source / f"{stem}.txt").write_text(f"a {stem} thing\n")
    (source / "no-caption.png").write_bytes(encode(WHITE))
    (source / "blank.png").write_bytes(encode(WHITE))
    (source / "blank.txt").write_text("  \n")
    (source / "broken.png").write_bytes(truncated_png())
    (source / "broken.txt").write_text("broken")
    return source


@pytest.fixture
def pick_a_pic_rows():
    return [
        ("image 0 wins", encode(RED), encode(BLUE, "JPEG"), 1.0),
        ("image 1 wins", encode(GREEN, "JPEG"), encode(YELLOW), 0.0),
        ("a tie", encode(RED), encode(BLUE), 0.5),
        ("", encode(RED), encode(BLUE), 1.0),
        ("corrupt winner", b"not an image at all", encode(BLUE), 1.0),
        ("corrupt loser", encode(WHITE), truncated_png(), 1.0),
    ]


def test_folder_round_trips_into_shards_and_counts_bad_samples(folder_source, tmp_path, caplog):
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="sspo.prepare"):
        summary = prepare(str(folder_source), str(output), resolution=R, shard_size=3)

    manifest = read_manifest(output)
    assert summary["num_samples"] == manifest["num_samples"] == 4
    assert manifest["format"] == "sspo-shards/1" and manifest["source_format"] == "folder"
    assert manifest["resolution"] == R and manifest["paired"] is False
    assert manifest["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1}
    assert [shard["num_samples"] for shard in manifest["shards"]] == [3, 1]
    assert set(manifest["files"]) == {"shard-00000.safetensors", "shard-00000.jsonl", "shard-00001.safetensors",
                                      "shard-00001.jsonl"}
    assert "corrupt_image=1, empty_caption=1, missing_caption=1" in caplog.text

    data = read_dataset(str(output))
    assert data.captions == ["a a thing", "a b thing", "a c thing", "a d thing"]
    assert data.splits == [None] * 4 and data.losers is None
    for pixels, color in zip(data.winners, [RED, GREEN, BLUE, YELLOW]):
        assert_color(pixels, color)


def test_jsonl_directory_like_the_toy_world_keeps_splits(tmp_path):
    source = tmp_path / "toy"
    (source / "images").mkdir(parents=True)
    records = []
    for index, (color, split) in enumerate([(RED, "train"), (GREEN, "test"), (BLUE, "train")]):
        (source / "images" / f"{index:05d}.png").write_bytes(encode(color))
        records.append({"file": f"images/{index:05d}.png", "caption": f"caption {index}", "color": "x",
                        "shape": "circle", "position": "left", "split": split})
    records.append({"file": "images/missing.png", "caption": "gone", "split": "train"})
    write_jsonl(source / "metadata.jsonl", records)

    summary = prepare(str(source), str(tmp_path / "out"), resolution=R)

    assert summary["source_format"] == "jsonl" and summary["skipped"] == {"missing_image": 1}
    lines = (tmp_path / "out" / "shard-00000.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"caption": "caption 0", "split": "train"},
        {"caption": "caption 1", "split": "test"},
        {"caption": "caption 2", "split": "train"},
    ]
    assert summary["shards"][0]["split_counts"] == {"test": 1, "train": 2}  # the missing image is not counted
    train = read_dataset(str(tmp_path / "out"), split="train")
    assert train.captions == ["caption 0", "caption 2"] and train.splits == ["train", "train"]
    assert_color(train.winners[1], BLUE, tolerance=0)
    with pytest.raises(SSPOError, match="no samples with split 'val'"):
        ShardDataset(str(tmp_path / "out"), split="val")


def test_jsonl_file_with_losers_keeps_pairs_relative_to_the_file(tmp_path):
    (tmp_path / "data" / "pics").mkdir(parents=True)
    for name, color in [("good", RED), ("bad", BLUE)]:
        (tmp_path / "data" / "pics" / f"{name}.png").write_bytes(encode(color))
    write_jsonl(tmp_path / "data" / "pairs.jsonl", [{"file": "pics/good.png", "loser": "pics/bad.png", "caption": "c"}])

    summary = prepare(str(tmp_path / "data" / "pairs.jsonl"), str(tmp_path / "out"), resolution=R, keep_pairs=True)

    assert summary["paired"] is True and summary["num_samples"] == 1
    data = read_dataset(str(tmp_path / "out"))
    assert_color(data.winners[0], RED, tolerance=0)
    assert_color(data.losers[0], BLUE, tolerance=0)


def test_each_images_original_size_and_crop_are_kept_for_sdxl(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wide.png").write_bytes(encode(RED, size=(40, 20)))
    (tmp_path / "data" / "tall.png").write_bytes(encode(BLUE, size=(10, 30)))
    # Stored 30 wide and 12 high, shown rotated by 90° (EXIF orientation 6): the original is 12 wide, 30 high.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (30, 12), GREEN).save(buffer, format="JPEG", exif=exif)
    (tmp_path / "data" / "rotated.jpg").write_bytes(buffer.getvalue())
    write_jsonl(tmp_path / "data" / "pairs.jsonl", [{"file": "wide.png", "loser": "tall.png", "caption": "c"},
                                                    {"file": "rotated.jpg", "loser": "wide.png", "caption": "d"}])

    prepare(str(tmp_path / "data" / "pairs.jsonl"), str(tmp_path / "out"), resolution=R, keep_pairs=True)

    batch = ShardDataset(str(tmp_path / "out")).batch([0, 1])
    # (original height, width, crop top, left): 40x20 → 16x8, crop left 4; 12x30 → 8x20, crop top 6; 10x30 → 8x24.
    assert batch["geometry"].tolist() == [[20, 40, 0, 4], [30, 12, 6, 0]]
    assert batch["loser_geometry"].tolist() == [[30, 10, 8, 0], [20, 40, 0, 4]]


def test_jsonl_missing_keys_is_a_format_error(tmp_path):
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "metadata.jsonl", [{"image": "a.png", "caption": "c"}])
    with pytest.raises(SSPOError, match=r"line 1: expected keys file, caption; found: image, caption"):
        prepare(str(tmp_path / "src"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_parquet_directory_keeps_winners_by_label(tmp_path, pick_a_pic_rows):
    source = tmp_path / "pickapic"
    source.mkdir()
    write_parquet(source / "train-0.parquet", pick_a_pic_rows[:3])
    write_parquet(source / "train-1.parquet", pick_a_pic_rows[3:])

    summary = prepare(str(source), str(tmp_path / "out"), resolution=R)

    assert summary["source_format"] == "parquet"
    assert summary["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "tie": 1}
    data = read_dataset(str(tmp_path / "out"))
    assert data.captions == ["image 0 wins", "image 1 wins", "corrupt loser"]
    for pixels, color in zip(data.winners, [RED, YELLOW, WHITE]):
        assert_color(pixels, color)


def test_parquet_keep_pairs_keeps_the_loser_in_both_label_directions(tmp_path, pick_a_pic_rows):
    write_parquet(tmp_path / "pairs.parquet", pick_a_pic_rows)

    summary = prepare(str(tmp_path / "pairs.parquet"), str(tmp_path / "out"), resolution=R, keep_pairs=True)

    # The corrupt loser now matters too.
    assert summary["skipped"] == {"corrupt_image": 2, "empty_caption": 1, "tie": 1}
    data = read_dataset(str(tmp_path / "out"))
    assert data.captions == ["image 0 wins", "image 1 wins"]
    assert_color(data.winners[0], RED)
    assert_color(data.losers[0], BLUE)
    assert_color(data.winners[1], YELLOW)
    assert_color(data.losers[1], GREEN)


def test_parquet_with_a_missing_column_names_it(tmp_path):
    write_parquet(tmp_path / "bad.parquet", [("c", encode(RED), 1.0)], names=("caption", "jpg_0", "label_0"))
    with pytest.raises(SSPOError, match=r"missing: jpg_1; found: caption, jpg_0, label_0"):
        prepare(str(tmp_path / "bad.parquet"), str(tmp_path / "out"))


def test_on_error_fail_names_the_sample_and_reason(tmp_path, pick_a_pic_rows):
    write_parquet(tmp_path / "pairs.parquet", pick_a_pic_rows)
    with pytest.raises(SSPOError, match=r"pairs.parquet row 3: empty_caption"):
        prepare(str(tmp_path / "pairs.parquet"), str(tmp_path / "out"), on_error="fail")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_any_work_and_left_untouched(folder_source, tmp_path):
    output = tmp_path / "out"
    prepare(str(folder_source), str(output), resolution=R)
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    # A missing source would fail later: the refusal must come first.
    with pytest.raises(SSPOError, match="already exists"):
        prepare(str(tmp_path / "nowhere"), str(output), resolution=R)
    with pytest.raises(SSPOError, match="already exists"):
        prepare(str(folder_source), str(output), resolution=R)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before


def test_missing_source_and_source_without_valid_samples_are_refused(tmp_path):
    with pytest.raises(SSPOError, match="not found: .*nowhere"):
        prepare(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.png").write_bytes(truncated_png())
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(SSPOError, match="no valid samples"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_limit_caps_the_number_of_samples(folder_source, tmp_path):
    assert prepare(str(folder_source), str(tmp_path / "out"), resolution=R, limit=2)["num_samples"] == 2


def test_file_url_source_and_output(folder_source, tmp_path):
    summary = prepare(f"file://{folder_source}", f"file://{tmp_path}/out", resolution=R)
    assert summary["num_samples"] == 4
    assert len(ShardDataset(f"file://{tmp_path}/out")) == 4


def test_resize_scales_the_shorter_side_then_center_crops():
    # A wide image: blue margins around a green square that is exactly the centre crop.
    image = Image.new("RGB", (48, 24), BLUE)
    image.paste(GREEN, (12, 0, 36, 24))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    prepared = to_pixels(buffer.getvalue(), 16, max_pixels=48 * 24)
    pixels = torch.tensor(prepared.pixels).permute(2, 0, 1)
    assert pixels.shape == (3, 16, 16)
    # SDXL's conditioning: original (height, width), then the crop's (top, left) in the 32x16 resized image.
    assert prepared.geometry == (24, 48, 0, 8)
    # Bicubic blends a pixel or two across the blue/green edges; the interior is pure green.
    assert (pixels[:, :, 2:14] == torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1)).all()


def test_batch_scales_pixels_to_unit_range(tmp_path):
    (tmp_path / "src").mkdir()
    for name, color in [("white", WHITE), ("black", BLACK)]:
        (tmp_path / "src" / f"{name}.png").write_bytes(encode(color))
        (tmp_path / "src" / f"{name}.txt").write_text(name)
    prepare(str(tmp_path / "src"), str(tmp_path / "out"), resolution=R)

    batch = ShardDataset(str(tmp_path / "out")).batch([1, 0, 1])

    assert batch["pixels"].shape == (3, 3, R, R) and batch["pixels"].dtype == torch.float32
    assert batch["captions"] == ["white", "black", "white"] and "loser_pixels" not in batch
    assert (batch["pixels"][0] == 1).all() and (batch["pixels"][1] == -1).all()


def test_shard_dataset_detects_a_tampered_shard(folder_source, tmp_path):
    prepare(str(folder_source), str(tmp_path / "out"), resolution=R)
    shard = tmp_path / "out" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SSPOError, match="sha256"):
        ShardDataset(str(tmp_path / "out")).rows([0])


def sspo_prepare(capsys, *args: str) -> tuple[int, str]:
    """`sspo prepare ARGS` in this process, without the repository's params.yaml: (exit code, stderr)."""
    code = main(["prepare", "--params", "", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("column", ["label_0", "jpg_0", "jpg_1"])
def test_parquet_column_of_strings_is_a_one_line_error(tmp_path, capsys, pick_a_pic_rows, column):
    """A string label_0 (say "1.0") used to fail in math.isnan, a string image column in the decoder."""
    rows = [dict(zip(("caption", "jpg_0", "jpg_1", "label_0"), row)) for row in pick_a_pic_rows[:2]]
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    columns[column] = [str(value) for value in columns[column]]
    pq.write_table(pa.table(columns), tmp_path / "pap.parquet")

    code, stderr = sspo_prepare(capsys, "--source", str(tmp_path / "pap.parquet"), "--output", str(tmp_path / "out"))

    assert code == 2
    assert_one_line_error(stderr, "prepare", f"pap.parquet: column {column} holds string values; expected")
    assert_nothing_published(tmp_path / "out")


def test_metadata_jsonl_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(encode(RED))
    text = '{"file": "a.png", "caption": "fine"}\n{"file": "a.png", "caption": "caf\u00e9"}\n'
    (tmp_path / "src" / "metadata.jsonl").write_bytes(text.encode("latin-1"))

    code, stderr = sspo_prepare(capsys, "--source", str(tmp_path / "src"), "--output", str(tmp_path / "out"))

    assert code == 2
    assert_one_line_error(stderr, "prepare", "metadata.jsonl is not UTF-8 text: line 2 holds the byte 0xe9")
    assert_nothing_published(tmp_path / "out")


def png_claiming(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG of width x height: a few tens of KB, but width*height*3 bytes once decoded to RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then 1 bit a pixel
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def sspo_prepare_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m sspo prepare ARGS` as its own process: stderr as a user sees it, Python warnings included."""
    return subprocess.run([sys.executable, "-m", "sspo", "prepare", "--params", "", *args], capture_output=True,
                          text=True)


@pytest.fixture
def bomb_source(tmp_path):
    """A good image and a 17.5 KB PNG claiming 12000 x 12000 pixels: 144 MP, past PIL's 89 MP warning."""
    source = tmp_path / "bomb"
    source.mkdir()
    (source / "good.png").write_bytes(encode(RED))
    (source / "good.txt").write_text("good")
    (source / "huge.png").write_bytes(png_claiming(12000, 12000))
    (source / "huge.txt").write_text("huge")
    return source


def test_image_claiming_too_many_pixels_is_counted_as_rejected_not_decoded(bomb_source, tmp_path):
    result = sspo_prepare_process("--source", str(bomb_source), "--output", str(tmp_path / "out"),
                                  "--resolution", str(R))

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "DecompressionBomb" not in result.stderr
    assert "skipped 1 samples" in result.stderr and "too_large=1" in result.stderr
    assert "prepare 2/2" in result.stderr  # progress off a terminal
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_samples"] == 1 and manifest["skipped"] == {"too_large": 1}


@pytest.mark.parametrize("side", [12000, 15000], ids=["past-PIL-warning", "past-PIL-error"])
def test_image_claiming_too_many_pixels_with_on_error_fail_is_a_one_line_error(tmp_path, side):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "huge.png").write_bytes(png_claiming(side, side))
    (tmp_path / "src" / "huge.txt").write_text("huge")

    result = sspo_prepare_process("--source", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
                                  "--on-error", "fail")

    assert result.returncode == 2
    assert_one_line_error(result.stderr, "prepare", "bad sample huge.png: too_large")
    assert_nothing_published(tmp_path / "out")


def test_max_pixels_is_checked_from_the_header(folder_source, tmp_path):
    # The fixture's images are 20 x 14 = 280 pixels.
    with pytest.raises(SSPOError, match=r"no valid samples .*'too_large': 4"):
        prepare(str(folder_source), str(tmp_path / "out"), resolution=R, max_pixels=279)
    with pytest.raises(SSPOError, match=r"bad sample a.png: too_large .*20x14 = 280 pixels > max_pixels 279"):
        prepare(str(folder_source), str(tmp_path / "out2"), resolution=R, max_pixels=279, on_error="fail")
    assert prepare(str(folder_source), str(tmp_path / "out3"), resolution=R, max_pixels=280)["num_samples"] == 4


@needs_root
def test_full_disk_publishes_nothing_and_names_the_path(tmp_path):
    """Shards of 40 samples at 64 x 64 (about 500 KB) cannot fit a 128 KB disk."""
    source = tmp_path / "src"
    source.mkdir()
    for index in range(40):
        (source / f"{index}.png").write_bytes(encode((index, 0, 0)))
        (source / f"{index}.txt").write_text(f"caption {index}")
    disk = tmp_path / "disk"

    result, left = sspo_on_full_disk(disk, "128k", "prepare", "--params", "", "--source", str(source),
                                     "--output", str(disk / "out"), "--resolution", "64")

    assert result.returncode == 2
    assert_one_line_error(result.stderr, "prepare", f"cannot write {disk / 'out'}: No space left on device",
                          str(disk))
    assert left == []


def test_max_pixels_flag_reaches_prepare(folder_source, tmp_path, capsys):
    code, stderr = sspo_prepare(capsys, "--source", str(folder_source), "--output", str(tmp_path / "out"),
                                "--resolution", "8", "--max-pixels", "279", "--on-error", "fail")
    assert code == 2
    assert_one_line_error(stderr, "prepare", "bad sample a.png: too_large", "20x14 = 280 pixels > max_pixels 279")
    assert_nothing_published(tmp_path / "out")


def test_parquet_label_outside_zero_to_one_is_skipped_and_counted(tmp_path):
    rows = [("red wins", encode(RED), encode(GREEN), 1.0), ("seven", encode(RED), encode(GREEN), 7.0),
            ("minus one", encode(RED), encode(GREEN), -1.0), ("infinite", encode(RED), encode(GREEN), math.inf)]
    write_parquet(tmp_path / "pap.parquet", rows)
    summary = prepare(str(tmp_path / "pap.parquet"), str(tmp_path / "out"), resolution=R)
    assert summary["skipped"] == {"bad_label": 3}
    assert read_dataset(str(tmp_path / "out")).captions == ["red wins"]
