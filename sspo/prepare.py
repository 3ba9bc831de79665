"""Turn a raw image/caption source into validated, resized training shards with a manifest.

Sources (any fsspec URL):
  folder   images (png/jpg/jpeg/webp/bmp), each with a sidecar `<stem>.txt` caption
  jsonl    a directory with `metadata.jsonl`, or a .jsonl file; lines hold `file`, `caption`, optional `loser`, `split`
  parquet  Pick-a-Pic-style file(s) with `caption`, `jpg_0`, `jpg_1`, `label_0`

Output: `shard-NNNNN.safetensors` (uint8 "winner" and, when paired, "loser", shape (n, 3, R, R)) next to
`shard-NNNNN.jsonl` (one {"caption", "split"?} line per sample, same order), published with a manifest.

With `encode_with` (a model folder) each shard also holds what training would otherwise compute every step, as
float32: the VAE's latent distribution of each image, unscaled ("winner_latent_mean", "winner_latent_logvar" and the
loser's), and each caption's text embeddings ("prompt_hidden", and SDXL's "prompt_pooled"). The manifest's
"encoded_with" names the model and the sha256 of its VAE and text encoder weights, so a trainer can check they fit.
Distributions rather than samples are stored, so each step still draws its own latent sample.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import posixpath
import struct
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from sspo import storage
from sspo.conditioning import uncropped_geometry
from sspo.config import PrepareConfig
from sspo.errors import SSPOError
from sspo.progress import Progress

logger = logging.getLogger(__name__)

FORMAT = "sspo-shards/1"
SOURCE_FORMATS = ("auto", "folder", "jsonl", "parquet")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
JSONL_METADATA = "metadata.jsonl"
IMAGE_BYTES = "encoded image bytes (binary)"
# What each column must hold, as a description and the arrow types that fit it. A column of nulls only fits too:
# its rows are counted as bad samples.
PARQUET_TYPES = {
    "caption": ("text", (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)),
    "jpg_0": (IMAGE_BYTES, (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)),
    "jpg_1": (IMAGE_BYTES, (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)),
    "label_0": ("numbers (1 when jpg_0 is preferred, 0 when jpg_1 is, 0.5 for a tie)",
                (pa.types.is_integer, pa.types.is_floating)),
}
PARQUET_COLUMNS = tuple(PARQUET_TYPES)
# Rows per parquet read: Pick-a-Pic rows carry two encoded images, so keep batches small to bound memory.
PARQUET_BATCH_ROWS = 64

REASONS = {
    "corrupt_image": "the image cannot be decoded",
    "empty_caption": "the caption is empty",
    "missing_image": "the image file does not exist",
    "missing_caption": "there is no .txt caption file next to the image",
    "unreadable_caption": "the caption file is not UTF-8 text",
    "missing_label": "label_0 is null or NaN",
    "bad_label": "label_0 is outside 0..1, so it says neither image is preferred",
    "tie": "the pair is a tie (label_0 = 0.5)",
    "too_large": "the image header claims more pixels than max_pixels (checked before decoding)",
}
# Ties are an expected part of preference data, not a defect, so on_error="fail" does not stop on them.
NOT_ERRORS = {"tie"}

# PIL reports undecodable input through many exception types, depending on the codec and where it breaks.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # the orientations that swap width and height
# Writes that fail for lack of space: a full disk, a full quota, a file size limit.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass
class RawSample:
    name: str  # where the sample came from, for error messages
    caption: object
    split: str | None
    # Readers return encoded bytes, or None when the image is missing; winner first, then the loser if kept.
    images: Sequence[Callable[[], bytes | None]] = ()
    problem: str | None = None  # a reason already known from the source, before any image is read


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def prepare(
    source: str,
    output: str,
    *,
    source_format: str = "auto",
    resolution: int = 32,
    keep_pairs: bool = False,
    on_error: str = "skip",
    limit: int | None = None,
    shard_size: int = 4096,
    max_pixels: int = PrepareConfig.max_pixels,
    encode_with: str = "",
    encode_batch_size: int = PrepareConfig.encode_batch_size,
) -> dict:
    """Validate and resize `source` into shards published at `output`; returns the manifest summary.

    `limit` caps the number of valid samples written. Images whose header claims more than `max_pixels` pixels are
    bad samples, refused before decoding. Bad samples are skipped and counted by reason, or with on_error="fail"
    the first one raises SSPOError. With `encode_with` the shards also hold latent distributions and prompt
    embeddings made by that model, `encode_batch_size` images or captions at a time.
    """
    if source_format not in SOURCE_FORMATS:
        raise SSPOError(f"unknown source format {source_format!r}; expected one of {', '.join(SOURCE_FORMATS)}")
    if on_error not in ("skip", "fail"):
        raise SSPOError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    if min(resolution, shard_size, max_pixels, encode_batch_size) < 1 or (limit is not None and limit < 1):
        raise SSPOError("resolution, shard_size, max_pixels, encode_batch_size and limit must be positive")

    skipped: Counter[str] = Counter()
    # Entered before any work, so an existing output (or a leftover of a failed run) is refused at once.
    with disk_full_as_error(output), storage.staged_output(output) as (staging, extra):
        fs, root = storage.filesystem(source)
        if not fs.exists(root):
            raise SSPOError(f"not found: {source}")
        fmt = detect_format(fs, root) if source_format == "auto" else source_format
        total, samples = SOURCES[fmt](fs, root, keep_pairs)
        encoder = ShardEncoder(encode_with, encode_batch_size) if encode_with else None

        writer = ShardWriter(staging, shard_size, keep_pairs, encoder)
        progress = Progress(total, "prepare")
        for raw in samples:
            try:
                images = load_sample(raw, resolution, max_pixels)
            except Rejected as rejected:
                if on_error == "fail" and rejected.reason not in NOT_ERRORS:
                    detail = f"; {rejected.detail}" if rejected.detail else ""
                    raise SSPOError(
                        f"bad sample {raw.name}: {rejected.reason} ({REASONS[rejected.reason]}{detail}); "
                        "use on_error='skip' to skip and count bad samples"
                    ) from None
                skipped[rejected.reason] += 1
            else:
                writer.add(images, raw.caption.strip(), raw.split)
            progress.update()
            if writer.num_samples == limit:
                break
        progress.close()
        shards = writer.close()
        if skipped:
            counts = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items()))
            logger.warning("skipped %d samples from %s: %s", sum(skipped.values()), source, counts)
        if not writer.num_samples:
            raise SSPOError(f"{source} holds no valid samples (skipped: {dict(skipped) or 'none'})")
        summary = {
            "format": FORMAT,
            "resolution": resolution,
            "num_samples": writer.num_samples,
            "paired": keep_pairs,
            "shards": shards,
            "skipped": dict(sorted(skipped.items())),
            "source": source,
            "source_format": fmt,
            **({"encoded_with": encoder.made_by} if encoder else {}),
        }
        extra.update(summary)
    logger.info("prepared %d samples in %d shards at %s", writer.num_samples, len(shards), output)
    return summary


def detect_format(fs, root: str) -> str:
    if fs.isfile(root):
        for fmt in ("parquet", "jsonl"):
            if root.endswith(f".{fmt}"):
                return fmt
        raise SSPOError(f"cannot tell the format of {root}: expected a .parquet or .jsonl file, or a directory")
    if parquet_files(fs, root):
        return "parquet"
    if fs.isfile(posixpath.join(root, JSONL_METADATA)):
        return "jsonl"
    return "folder"


@contextlib.contextmanager
def disk_full_as_error(output: str):
    """A write that fails for lack of space while `output` is staged or published ends in one line naming the
    path that is full. staged_output has removed its staging folder by then, so nothing half-written remains."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        # Without a file name, the full disk is the one staged_output stages on: beside a local output, else $TMPDIR.
        where = err.filename or (storage.local_path(output).parent if storage.is_local(output)
                                 else tempfile.gettempdir())
        raise SSPOError(f"cannot write {output}: {err.strerror} (writing in {where}); nothing was published") from None


def load_sample(raw: RawSample, resolution: int, max_pixels: int) -> list[PreparedImage]:
    """The sample's images at resolution R; raises Rejected with the reason it is unusable."""
    if raw.problem:
        raise Rejected(raw.problem)
    if not isinstance(raw.caption, str) or not raw.caption.strip():
        raise Rejected("empty_caption")
    images = []
    for read in raw.images:
        data = read()
        if data is None:
            raise Rejected("missing_image")
        try:
            images.append(to_pixels(data, resolution, max_pixels))
        except DECODE_ERRORS:
            raise Rejected("corrupt_image") from None
    return images


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read, refused (Rejected "too_large") when it claims more than max_pixels.

    max_pixels is the one limit: PIL's own decompression-bomb warning (which would be a stray line on stderr) is
    silenced, and its error, for more than twice Image.MAX_IMAGE_PIXELS, counts as too_large as well.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise Rejected("too_large", str(err)) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise Rejected("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    return image


class PreparedImage(NamedTuple):
    pixels: np.ndarray  # (R, R, 3) uint8
    # Original height and width, then the crop's top and left in the resized image: SDXL is conditioned on them.
    geometry: tuple[int, int, int, int]


def to_pixels(data: bytes, resolution: int, max_pixels: int) -> PreparedImage:
    """Decode, convert to RGB, resize the shorter side to `resolution` and center-crop to a square."""
    with open_image(data, max_pixels) as opened:
        original_size = opened.size[::-1]  # (height, width) as stored, before draft decoding shrinks it
        if opened.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
            original_size = original_size[::-1]
        # Lets JPEG decode at a reduced scale that is still at least resolution x resolution: much faster.
        opened.draft("RGB", (resolution, resolution))
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "P", "PA"):
            # Transparent areas become white instead of whatever colour happens to be hidden under them.
            rgba = image.convert("RGBA")
            image = Image.new("RGBA", rgba.size, "white")
            image.alpha_composite(rgba)
        image = image.convert("RGB")
    scale = resolution / min(image.size)
    width = max(resolution, round(image.width * scale))
    height = max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)))
    return PreparedImage(pixels, (*original_size, top, left))


class ShardWriter:
    """Buffers up to `shard_size` samples, then writes them as one safetensors file plus a captions file."""

    def __init__(self, directory: Path, shard_size: int, paired: bool, encoder: ShardEncoder | None = None):
        self.directory = directory
        self.shard_size = shard_size
        self.paired = paired
        self.encoder = encoder
        self.shards: list[dict] = []
        self.num_samples = 0
        self.pending: list[tuple[list[PreparedImage], str, str | None]] = []

    def add(self, images: list[PreparedImage], caption: str, split: str | None) -> None:
        self.pending.append((images, caption, split))
        self.num_samples += 1
        if len(self.pending) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        roles = ("winner", "loser") if self.paired else ("winner",)
        tensors = {}
        for i, role in enumerate(roles):
            pixels = np.stack([images[i].pixels for images, _, _ in self.pending])
            # Channel-first copies: safetensors stores raw memory, so a permuted view must be made contiguous.
            tensors[role] = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
            tensors[f"{role}_geometry"] = torch.tensor([images[i].geometry for images, _, _ in self.pending],
                                                       dtype=torch.int32)
        if self.encoder is not None:
            captions = [caption for _, caption, _ in self.pending]
            tensors.update(self.encoder({role: tensors[role] for role in roles}, captions))
        storage.save_tensors(tensors, self.directory / f"{name}.safetensors")
        with open(self.directory / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for _, caption, split in self.pending:
                line = {"caption": caption} if split is None else {"caption": caption, "split": split}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.shards.append(
            {"tensors": f"{name}.safetensors", "captions": f"{name}.jsonl", "num_samples": len(self.pending)}
        )
        self.pending = []

    def close(self) -> list[dict]:
        if self.pending:
            self.flush()
        return self.shards


class ShardEncoder:
    """Encodes one shard's images and captions with a model's VAE and text encoders, `batch_size` at a time."""

    def __init__(self, model_url: str, batch_size: int):
        from sspo.models import encoder_digests, load_encoders  # diffusers and transformers: only when encoding

        self.encoders = load_encoders(model_url).to("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        # The scaling factor is not applied to what is stored: the trainer applies its model's own.
        self.made_by = {"model": storage.absolute(model_url),
                        "weights": encoder_digests(self.encoders.path, self.encoders.family)}

    def batches(self, items):
        return (items[start:start + self.batch_size] for start in range(0, len(items), self.batch_size))

    def __call__(self, pixels: dict[str, torch.Tensor], captions: list[str]) -> dict[str, torch.Tensor]:
        """The tensors to store next to the shard's uint8 images (by role) and captions."""
        tensors = {}
        for role, images in pixels.items():
            means, logvars = zip(*(self.encoders.latent_distribution(to_unit_range(batch))
                                   for batch in self.batches(images)))
            tensors[f"{role}_latent_mean"], tensors[f"{role}_latent_logvar"] = stored(means), stored(logvars)
        prompts = [self.encoders.embed(batch) for batch in self.batches(captions)]
        tensors["prompt_hidden"] = stored([prompt.hidden for prompt in prompts])
        if prompts[0].pooled is not None:
            tensors["prompt_pooled"] = stored([prompt.pooled for prompt in prompts])
        return tensors


def stored(batches) -> torch.Tensor:
    """Batches as one float32 CPU tensor in its own memory (safetensors stores raw memory; the VAE's mean and log
    variance are views of one tensor)."""
    return torch.cat([batch.to("cpu", torch.float32) for batch in batches]).contiguous()


def file_reader(fs, path: str) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        try:
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError):
            return None

    return read


def folder_source(fs, root: str, keep_pairs: bool) -> tuple[int, Iterator[RawSample]]:
    if keep_pairs:
        raise SSPOError("keep_pairs needs losers, which a folder source lacks: use jsonl with 'loser' or parquet")
    if not fs.isdir(root):
        raise SSPOError(f"a folder source must be a directory: {root}")
    root = root.rstrip("/")
    files = set(fs.find(root))
    images = sorted(p for p in files if p.lower().endswith(IMAGE_EXTENSIONS))

    def samples() -> Iterator[RawSample]:
        for image in images:
            name = image[len(root) + 1 :]
            caption_file = posixpath.splitext(image)[0] + ".txt"
            if caption_file not in files:
                yield RawSample(name, None, None, problem="missing_caption")
                continue
            try:
                caption = fs.cat_file(caption_file).decode("utf-8")
            except UnicodeDecodeError:
                yield RawSample(name, None, None, problem="unreadable_caption")
                continue
            yield RawSample(name, caption, None, [file_reader(fs, image)])

    return len(images), samples()


def jsonl_source(fs, root: str, keep_pairs: bool) -> tuple[int, Iterator[RawSample]]:
    metadata = root if fs.isfile(root) else posixpath.join(root, JSONL_METADATA)
    if not fs.isfile(metadata):
        raise SSPOError(f"not found: {metadata}")
    base = posixpath.dirname(metadata)
    required = ("file", "caption", "loser") if keep_pairs else ("file", "caption")
    data = fs.cat_file(metadata)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_number, byte = data[: err.start].count(b"\n") + 1, data[err.start]
        raise SSPOError(f"{metadata} is not UTF-8 text: line {line_number} holds the byte {byte:#04x}") from None
    records = []
    # Parsed and checked up front: a format error should stop the run before any image is processed.
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SSPOError(f"{metadata} line {number} is not valid JSON: {err}") from err
        if not isinstance(record, dict) or any(key not in record for key in required):
            found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise SSPOError(f"{metadata} line {number}: expected keys {', '.join(required)}; found: {found}")
        records.append((number, record))

    def reader(relative) -> Callable[[], bytes | None]:
        if not isinstance(relative, str) or not relative:
            return lambda: None
        return file_reader(fs, posixpath.normpath(posixpath.join(base, relative)))

    def samples() -> Iterator[RawSample]:
        for number, record in records:
            paths = [record["file"], record["loser"]] if keep_pairs else [record["file"]]
            split = record.get("split")
            yield RawSample(
                f"{posixpath.basename(metadata)} line {number} ({record['file']})",
                record["caption"],
                None if split is None else str(split),
                [reader(path) for path in paths],
            )

    return len(records), samples()


def parquet_files(fs, root: str) -> list[str]:
    if fs.isfile(root):
        return [root]
    return sorted(p for p in fs.find(root) if p.endswith(".parquet"))


def parquet_source(fs, root: str, keep_pairs: bool) -> tuple[int, Iterator[RawSample]]:
    files = parquet_files(fs, root)
    if not files:
        raise SSPOError(f"no .parquet files in {root}")
    total = 0
    # Every file's columns are checked before any image is processed, so a format error stops the run at once.
    for path in files:
        with fs.open(path, "rb") as f:
            try:
                parquet = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as err:
                raise SSPOError(f"{path} is not a readable parquet file: {err}") from err
            schema = parquet.schema_arrow
            missing = [column for column in PARQUET_COLUMNS if column not in schema.names]
            if missing:
                raise SSPOError(
                    f"{path}: expected columns {', '.join(PARQUET_COLUMNS)}; missing: {', '.join(missing)}; "
                    f"found: {', '.join(schema.names)}"
                )
            for column, (expected, fitting) in PARQUET_TYPES.items():
                kind = schema.field(column).type
                if not any(fits(kind) for fits in (*fitting, pa.types.is_null)):
                    raise SSPOError(f"{path}: column {column} holds {kind} values; expected {expected}")
            total += parquet.metadata.num_rows

    def samples() -> Iterator[RawSample]:
        for path in files:
            with fs.open(path, "rb") as f:
                row = 0
                batches = pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(PARQUET_COLUMNS))
                for batch in batches:
                    columns = [batch.column(column).to_pylist() for column in PARQUET_COLUMNS]
                    for caption, image_0, image_1, label_0 in zip(*columns):
                        name = f"{posixpath.basename(path)} row {row}"
                        yield pair_sample(name, caption, image_0, image_1, label_0, keep_pairs)
                        row += 1

    return total, samples()


def pair_sample(name: str, caption, image_0, image_1, label_0, keep_pairs: bool) -> RawSample:
    if label_0 is None or math.isnan(label_0):
        return RawSample(name, caption, None, problem="missing_label")
    if not 0 <= label_0 <= 1:
        return RawSample(name, caption, None, problem="bad_label")
    if label_0 == 0.5:
        return RawSample(name, caption, None, problem="tie")
    winner, loser = (image_0, image_1) if label_0 > 0.5 else (image_1, image_0)
    images = (winner, loser) if keep_pairs else (winner,)
    return RawSample(name, caption, None, [lambda data=data: data for data in images])


SOURCES = {"folder": folder_source, "jsonl": jsonl_source, "parquet": parquet_source}


# Tensors that `encode_with` adds to a shard, by the name `ShardDataset.batch` gives them.
ENCODED = {"latent_mean": "winner_latent_mean", "latent_logvar": "winner_latent_logvar",
           "loser_latent_mean": "loser_latent_mean", "loser_latent_logvar": "loser_latent_logvar",
           "prompt_hidden": "prompt_hidden", "prompt_pooled": "prompt_pooled"}


class ShardDataset:
    """A prepared dataset held in memory, checked against its manifest's sha256 sums.

    With `encodings` (the default) the latent distributions and prompt embeddings of a dataset prepared with
    `encode_with` are loaded too: `encodings` holds them by batch key, `encoded_with` names the model that made them
    (None when the dataset has none, or they are not wanted).
    """

    def __init__(self, url_or_dir: str, split: str | None = None, encodings: bool = True):
        directory = storage.fetch_dir(url_or_dir)
        manifest = storage.verify_dir(directory)
        if manifest.get("format") != FORMAT:
            raise SSPOError(
                f"{url_or_dir} is not a prepared dataset (format {manifest.get('format')!r}, expected {FORMAT!r})"
            )
        self.resolution: int = manifest["resolution"]
        self.encoded_with: dict | None = manifest.get("encoded_with") if encodings else None
        winners, losers, captions, splits = [], [], [], []
        encoded: dict[str, list[torch.Tensor]] = {}
        geometry: dict[str, list[torch.Tensor]] = {"winner": [], "loser": []}
        for shard in manifest["shards"]:
            tensors = load_file(str(directory / shard["tensors"]))
            captions_text = (directory / shard["captions"]).read_text(encoding="utf-8")
            lines = [json.loads(line) for line in captions_text.splitlines()]
            if not len(tensors["winner"]) == len(lines) == shard["num_samples"]:
                raise SSPOError(f"{url_or_dir}: {shard['tensors']} and {shard['captions']} disagree on sample count")
            winners.append(tensors["winner"])
            if manifest["paired"]:
                losers.append(tensors["loser"])
            for role in ("winner", "loser") if manifest["paired"] else ("winner",):
                # Datasets prepared before geometry was recorded hold uncropped images at the resolution.
                default = uncropped_geometry(len(lines), self.resolution).to(torch.int32)
                geometry[role].append(tensors.get(f"{role}_geometry", default))
            if self.encoded_with is not None:
                for key, name in ENCODED.items():
                    if name in tensors:
                        encoded.setdefault(key, []).append(tensors[name])
            captions += [line["caption"] for line in lines]
            splits += [line.get("split") for line in lines]
        keep = [i for i, s in enumerate(splits) if split is None or s == split]
        if not keep:
            known = sorted({s for s in splits if s is not None})
            raise SSPOError(f"{url_or_dir} has no samples with split {split!r} (splits present: {known or 'none'})")
        index = torch.tensor(keep)
        self.winners: torch.Tensor = torch.cat(winners)[index]
        self.losers: torch.Tensor | None = torch.cat(losers)[index] if losers else None
        self.geometry = {role: torch.cat(rows)[index] for role, rows in geometry.items() if rows}
        self.encodings: dict[str, torch.Tensor] = {key: torch.cat(rows)[index] for key, rows in encoded.items()}
        self.captions: list[str] = [captions[i] for i in keep]
        self.splits: list[str | None] = [splits[i] for i in keep]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, indices) -> dict:
        """Pixels scaled to [-1, 1] as float32 (B, 3, R, R), with the matching losers, captions and each image's
        (original height, original width, crop top, crop left); and the loaded `encodings` of those samples
        (latent_mean, latent_logvar, loser_latent_mean, loser_latent_logvar, prompt_hidden, prompt_pooled)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {
            "pixels": to_unit_range(self.winners[index]),
            "loser_pixels": None if self.losers is None else to_unit_range(self.losers[index]),
            "geometry": self.geometry["winner"][index],
            "loser_geometry": self.geometry["loser"][index] if "loser" in self.geometry else None,
            "captions": [self.captions[i] for i in index.tolist()],
            **{key: encoded[index] for key, encoded in self.encodings.items()},
        }


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0
