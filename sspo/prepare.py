"""Turn a raw image/caption source into validated, resized training shards with a manifest.

Sources (any fsspec URL):
  folder   images (png/jpg/jpeg/webp/bmp), each with a sidecar `<stem>.txt` caption
  jsonl    a directory with `metadata.jsonl`, or a .jsonl file; lines hold `file`, `caption`, optional `loser`, `split`
  parquet  Pick-a-Pic-style file(s) with `caption`, `jpg_0`, `jpg_1`, `label_0`, as Hugging Face publishes them
           (`data/train-00000-of-00645-<hash>.parquet`, `data/validation_unique-...`, or split folders such as
           `train/0000.parquet`): the split in a file's name or folder becomes its samples' split

Clips. With `frames` N > 0 the samples are clips instead of images: animated GIFs (as `sspo world --video` writes
them) or video files (MP4, WebM, MOV, MKV, AVI), listed in metadata.jsonl or as a folder's `<name>.mp4` +
`<name>.txt`, or, in a folder source, folders of frame images (`<name>/0001.png`, ... with `<name>.txt`). Each keeps its first N frames, each frame resized and cropped
as an image is; a clip with fewer is a bad sample (short_clip). Shards then hold (n, N, 3, R, R) and the manifest
records "frames": N.

Output: `shard-NNNNN.safetensors` (uint8 "winner" and, when paired, "loser", shape (n, 3, R, R)) next to
`shard-NNNNN.jsonl` (one {"caption", "split"?} line per sample, same order), published with a manifest whose
"shards" list each shard's files, sample count and samples per split.

With `encode_with` (a model folder) each shard also holds what training would otherwise compute every step, as
float32: the VAE's latent distribution of each image, unscaled ("winner_latent_mean", "winner_latent_logvar" and the
loser's), and each caption's text embeddings ("prompt_hidden", and SDXL's "prompt_pooled"). The manifest's
"encoded_with" names the model and the sha256 of its VAE and text encoders weights, so a trainer can check they fit.
Distributions rather than samples are stored, so each step still draws its own latent sample.

Scaling out. `workers` processes decode and resize the images (the CPU work) while this process reads the source
and writes the shards, in source order: the output is the same for any number of workers. `parts` splits the
source into that many contiguous groups of its files (parquet), images (folder) or records (jsonl); each part is
prepared and published on its own, below the output in `parts/part-K-of-N/`, so parts can run in parallel pods and a
part already published is not made again. The merge then writes the dataset's manifest, which lists every part's
shards (their paths include the part's folder) with the sha256 the parts recorded: one dataset, in source order.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import multiprocessing
import posixpath
import re
import shutil
import tempfile
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sspo import storage
from sspo.config import PrepareConfig
from sspo.decoding import PreparedImage, Rejected, decode_chunk, decode_sample
from sspo.errors import SSPOError
from sspo.progress import Progress

logger = logging.getLogger(__name__)

FORMAT = "sspo-shards/1"
SHARD_BYTES = 256 * 2**20
SOURCE_FORMATS = ("auto", "folder", "jsonl", "parquet")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_EXTENSIONS = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")
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
# Hugging Face's names for the shards of a split: `<split>-00000-of-00645[-<hash>].parquet`.
SHARDED_SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d+-of-\d+(-[0-9a-f]+)?\.parquet$")
# Folder and file names that name a split by themselves (`train/0000.parquet`, `test.parquet`).
SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test", "eval")

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
    "short_clip": "the clip has fewer frames than frames",
}
# Ties are an expected part of preference data, not a defect, so on_error="fail" does not stop on them.
NOT_ERRORS = {"tie"}

# Writes that fail for lack of space: a full disk, a full quota, a file size limit.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

PARTS_FOLDER = "parts"
# Samples per task sent to a worker, and tasks in flight per worker: enough to keep workers busy while this process
# reads ahead, few enough that the encoded bytes held in memory stay small.
WORKER_CHUNK = 16
CHUNKS_PER_WORKER = 2


@dataclass
class RawSample:
    name: str  # where the sample came from, for error messages
    caption: object
    split: str | None
    # Readers return encoded bytes, or None when the image is missing; winner first, then the loser if kept.
    images: Sequence[Callable[[], bytes | None]] = ()
    problem: str | None = None  # a reason already known from the source, before any image is read


def samples_per_shard(resolution: int, paired: bool, frames: int) -> int:
    """Samples that make a shard of about SHARD_BYTES of pixels: small enough that a training window of shards fits
    a local cache, large enough that a million pairs are a few thousand files."""
    return max(1, SHARD_BYTES // (3 * resolution * resolution * (2 if paired else 1) * max(frames, 1)))


@dataclass(frozen=True)
class Recipe:
    """How shards are made from a source. Each part records it, so a rerun reuses only parts made the same way."""

    resolution: int
    keep_pairs: bool
    on_error: str
    limit: int | None
    shard_size: int
    max_pixels: int
    encode_with: str  # absolute, '' for none
    encode_batch_size: int
    frames: int = 0  # clips of this many frames; 0 for images


@dataclass
class Source:
    """A source as the units that parts divide (parquet files, image files or JSONL records, in order) and a reader
    of some of them: (their number of samples, the samples)."""

    format: str
    units: list
    read: Callable[[list], tuple[int, Iterator[RawSample]]]


def prepare(
    source: str,
    output: str,
    *,
    source_format: str = "auto",
    resolution: int = 32,
    keep_pairs: bool = False,
    on_error: str = "skip",
    limit: int | None = None,
    shard_size: int = 0,
    max_pixels: int = PrepareConfig.max_pixels,
    encode_with: str = "",
    encode_batch_size: int = PrepareConfig.encode_batch_size,
    workers: int = 1,
    parts: int = 1,
    part: int | None = None,
    merge: bool = False,
    frames: int = 0,
) -> dict:
    """Validate and resize `source` into shards published at `output`; returns the manifest summary.

    `limit` caps the number of valid samples written. Images whose header claims more than `max_pixels` pixels are
    bad samples, refused before decoding. Bad samples are skipped and counted by reason, or with on_error="fail"
    the first one raises SSPOError. With `encode_with` the shards also hold latent distributions and prompt
    embeddings made by that model, `encode_batch_size` images or captions at a time. `workers` processes decode
    the images.

    With `part` only that part (0-based) of `parts` is prepared and published (nothing is done when it already is);
    with `merge` only the dataset manifest is written, from the published parts; with neither, and `parts` > 1,
    every part not yet published is prepared, then merged. With `frames` the samples are clips of that many frames.
    """
    if source_format not in SOURCE_FORMATS:
        raise SSPOError(f"unknown source format {source_format!r}; expected one of {', '.join(SOURCE_FORMATS)}")
    if on_error not in ("skip", "fail"):
        raise SSPOError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    if min(resolution, max_pixels, encode_batch_size, workers, parts) < 1 or shard_size < 0 or (
            limit is not None and limit < 1):
        raise SSPOError("resolution, max_pixels, encode_batch_size, workers, parts and limit must be positive, and "
                        "shard_size 0 (by size) or positive")
    if frames < 0:
        raise SSPOError(f"frames must be 0 (images) or positive (clips), not {frames}")
    if part is not None and not 0 <= part < parts:
        raise SSPOError(f"part must be between 0 and parts - 1 = {parts - 1}, not {part}")
    if part is not None and merge:
        raise SSPOError("give part (prepare one part) or merge (merge the published parts), not both")
    if limit is not None and parts > 1:
        raise SSPOError("limit caps the whole dataset, which parts prepared on their own cannot do: use parts 1")
    recipe = Recipe(resolution, keep_pairs, on_error, limit, shard_size, max_pixels,
                    storage.absolute(encode_with) if encode_with else "", encode_batch_size, frames)

    if part is None and not merge and parts == 1:
        # Entered before any work, so an existing output (or a leftover of a failed run) is refused at once.
        with disk_full_as_error(output), storage.staged_output(output) as (staging, extra):
            opened = open_source(source, source_format, keep_pairs, frames)
            summary = write_shards(source, opened, opened.units, staging, recipe, workers)
            if not summary["num_samples"]:
                raise SSPOError(f"{source} holds no valid samples (skipped: {summary['skipped'] or 'none'})")
            extra.update(summary)
        logger.info("prepared %d samples in %d shards at %s", summary["num_samples"], len(summary["shards"]), output)
        return summary

    storage.require_writable(output)
    opened = open_source(source, source_format, keep_pairs, frames)
    count = part_count(opened, parts)
    if part is not None and part >= count:
        raise SSPOError(f"part {part} does not exist: {source} has {len(opened.units)} {unit_name(opened)}, so "
                        f"it makes {count} part(s), not {parts}")
    manifest_url = storage.join(output, storage.MANIFEST)
    if storage.exists(manifest_url) and storage.read_json(manifest_url).get("parts") != count:
        raise SSPOError(f"{output} already exists as another dataset; outputs are never overwritten")
    with disk_full_as_error(output):
        if merge:
            return merge_parts(source, opened, output, count)
        built = [k for k in ([part] if part is not None else range(count))
                 if prepare_part(source, opened, output, k, count, recipe, workers)]
        if part is not None:
            return storage.read_json(storage.join(part_url(output, part, count), storage.MANIFEST))
        return {**merge_parts(source, opened, output, count), "built_parts": built}


def open_source(source: str, source_format: str, keep_pairs: bool, frames: int = 0) -> Source:
    fs, root = storage.filesystem(source)
    if not fs.exists(root):
        raise SSPOError(f"not found: {source}")
    fmt = detect_format(fs, root) if source_format == "auto" else source_format
    if fmt == "folder":
        return folder_source(fs, root, keep_pairs, frames)
    if fmt == "parquet" and frames:
        raise SSPOError("frames asks for clips, but a parquet source holds images: use frames 0")
    return SOURCES[fmt](fs, root, keep_pairs)


def unit_name(opened: Source) -> str:
    return {"parquet": "parquet files", "folder": "images or clips", "jsonl": "records"}[opened.format]


def part_count(opened: Source, parts: int) -> int:
    """The number of parts `parts` asks for, fewer when the source has fewer units: no part is empty."""
    return max(1, min(parts, len(opened.units)))


def part_units(units: list, part: int, count: int) -> list:
    """The contiguous group of `units` that is part `part` of `count`: the parts in order are the units in order."""
    return units[len(units) * part // count:len(units) * (part + 1) // count]


def part_folder(part: int, count: int) -> str:
    return f"{PARTS_FOLDER}/part-{part:05d}-of-{count:05d}"


def part_url(output: str, part: int, count: int) -> str:
    return storage.join(output, part_folder(part, count))


def part_numbers(source: str, source_format: str = "auto", parts: int = 1, frames: int = 0) -> list[int]:
    """The parts a source makes when split into `parts` (fewer when it has fewer files, images, clips or records)."""
    if source_format not in SOURCE_FORMATS:
        raise SSPOError(f"unknown source format {source_format!r}; expected one of {', '.join(SOURCE_FORMATS)}")
    return list(range(part_count(open_source(source, source_format, keep_pairs=False, frames=frames), parts)))


def prepare_part(source: str, opened: Source, output: str, part: int, count: int, recipe: Recipe,
                 workers: int) -> bool:
    """Prepare and publish one part; False when it was already published (made the same way)."""
    url = part_url(output, part, count)
    settings = {"source": storage.absolute(source), "source_format": opened.format, **asdict(recipe)}
    if storage.is_published(url):
        recorded = storage.read_json(storage.join(url, storage.MANIFEST)).get("settings") or {}
        changed = sorted(key for key in settings if recorded.get(key) != settings[key])
        if changed:
            raise SSPOError(f"{url} was made with other settings ({', '.join(changed)}); the parts of one dataset "
                            "must be made alike: choose another output")
        logger.info("part %d of %d is already published at %s", part, count, url)
        return False
    if storage.is_local(url) and storage.local_path(url).exists():
        # A part stopped before its manifest was written: nobody trusts it, and it is made again from the start.
        shutil.rmtree(storage.local_path(url))
    with storage.staged_output(url) as (staging, extra):
        summary = write_shards(source, opened, part_units(opened.units, part, count), staging, recipe, workers)
        extra.update({**summary, "part": part, "parts": count, "settings": settings})
    logger.info("prepared part %d of %d: %d samples in %d shards at %s", part, count, summary["num_samples"],
                len(summary["shards"]), url)
    return True


# Manifest keys on which the parts of one dataset must agree.
PART_AGREEMENT = ("format", "resolution", "paired", "encoded_with", "frames")


def merge_parts(source: str, opened: Source, output: str, count: int) -> dict:
    """Write the dataset manifest at `output` listing the shards of its `count` published parts, with the sha256
    each part recorded (nothing is downloaded). Merging again the same parts changes nothing."""
    urls = [part_url(output, k, count) for k in range(count)]
    missing = [k for k, url in enumerate(urls) if not storage.is_published(url)]
    if missing:
        raise SSPOError(f"cannot merge {output}: part(s) {', '.join(map(str, missing))} of {count} are not "
                        f"published; prepare them first (--part K --parts {count}, or no --part for all)")
    manifests = [storage.read_json(storage.join(url, storage.MANIFEST)) for url in urls]
    for key in PART_AGREEMENT:
        values = {json.dumps(manifest.get(key), sort_keys=True) for manifest in manifests}
        if len(values) > 1:
            raise SSPOError(f"cannot merge {output}: its parts differ in {key} ({', '.join(sorted(values))})")
    files, shards, skipped = {}, [], Counter()
    for k, manifest in enumerate(manifests):
        folder = part_folder(k, count)
        for shard in manifest["shards"]:
            merged = {**shard, "tensors": f"{folder}/{shard['tensors']}", "captions": f"{folder}/{shard['captions']}"}
            for key in ("tensors", "captions"):
                files[merged[key]] = manifest["files"][shard[key]]
            shards.append(merged)
        skipped.update(manifest["skipped"])
    num_samples = sum(shard["num_samples"] for shard in shards)
    if not num_samples:
        raise SSPOError(f"{source} holds no valid samples (skipped: {dict(skipped) or 'none'})")
    first = manifests[0]
    summary = {
        "format": FORMAT,
        "resolution": first["resolution"],
        "num_samples": num_samples,
        "paired": first["paired"],
        "shards": shards,
        "skipped": dict(sorted(skipped.items())),
        "source": source,
        "source_format": opened.format,
        "parts": count,
        **({"frames": first["frames"]} if "frames" in first else {}),
        **({"encoded_with": first["encoded_with"]} if "encoded_with" in first else {}),
    }
    manifest_url = storage.join(output, storage.MANIFEST)
    payload = json.dumps({"files": files, **summary, "publish_id": uuid.uuid4().hex}, indent=2, sort_keys=True)
    if not storage.create_bytes(manifest_url, payload.encode()):
        existing = storage.read_json(manifest_url)
        if {key: existing.get(key) for key in ("files", "shards")} != {"files": files, "shards": shards}:
            raise SSPOError(f"{output} already exists with other shards; outputs are never overwritten")
        logger.info("%s is already merged from its %d parts", output, count)
        return {key: existing[key] for key in summary if key in existing}
    logger.info("merged %d parts into %s: %d samples in %d shards", count, output, num_samples, len(shards))
    return summary


def write_shards(source: str, opened: Source, units: list, staging: Path, recipe: Recipe, workers: int) -> dict:
    """Shards of the samples of `units` written into `staging`; returns their manifest summary."""
    total, samples = opened.read(units)
    encoder = ShardEncoder(recipe.encode_with, recipe.encode_batch_size) if recipe.encode_with else None
    shard_size = recipe.shard_size or samples_per_shard(recipe.resolution, recipe.keep_pairs, recipe.frames)
    writer = ShardWriter(staging, shard_size, recipe.keep_pairs, encoder)
    skipped: Counter[str] = Counter()
    progress = Progress(total, "prepare")
    for raw, outcome in decoded(samples, recipe.resolution, recipe.max_pixels, workers, recipe.frames):
        if isinstance(outcome, Rejected):
            if recipe.on_error == "fail" and outcome.reason not in NOT_ERRORS:
                detail = f"; {outcome.detail}" if outcome.detail else ""
                raise SSPOError(
                    f"bad sample {raw.name}: {outcome.reason} ({REASONS[outcome.reason]}{detail}); "
                    "use on_error='skip' to skip and count bad samples"
                )
            skipped[outcome.reason] += 1
        else:
            writer.add(outcome, raw.caption.strip(), raw.split)
        progress.update()
        if writer.num_samples == recipe.limit:
            break
    progress.close()
    shards = writer.close()
    if skipped:
        counts = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items()))
        logger.warning("skipped %d samples from %s: %s", sum(skipped.values()), source, counts)
    return {
        "format": FORMAT,
        "resolution": recipe.resolution,
        "num_samples": writer.num_samples,
        "paired": recipe.keep_pairs,
        "shards": shards,
        "skipped": dict(sorted(skipped.items())),
        "source": source,
        "source_format": opened.format,
        **({"frames": recipe.frames} if recipe.frames else {}),
        **({"encoded_with": encoder.made_by} if encoder else {}),
    }


def decoded(samples: Iterable[RawSample], resolution: int, max_pixels: int, workers: int,
            frames: int = 0) -> Iterator[tuple[RawSample, list[PreparedImage] | Rejected]]:
    """Each sample with its images at resolution R, or the Rejected that says why it is unusable, in source order.

    Bytes are read here; with more than one worker, processes of a pool decode and resize them, a bounded number of
    chunks ahead, and the results come back in order: what is written does not depend on `workers`.
    """
    if workers == 1:
        for raw in samples:
            yield raw, decode_sample(read_sample(raw), resolution, max_pixels, frames)
        return
    context = multiprocessing.get_context("forkserver")  # forking a process that runs I/O threads is unsafe
    context.set_forkserver_preload(["sspo.decoding"])  # imported once, by the server: workers start at once
    with context.Pool(workers) as pool:
        pending: deque = deque()
        chunk: list[RawSample] = []

        def submit():
            payloads = [read_sample(raw) for raw in chunk]
            pending.append((chunk, pool.apply_async(decode_chunk, (payloads, resolution, max_pixels, frames))))

        for raw in samples:
            chunk.append(raw)
            if len(chunk) == WORKER_CHUNK:
                submit()
                chunk = []
                if len(pending) > CHUNKS_PER_WORKER * workers:
                    done, result = pending.popleft()
                    yield from zip(done, result.get())
        if chunk:
            submit()
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())


def read_sample(raw: RawSample) -> list[bytes | None] | Rejected:
    """The sample's encoded images (None where one is missing), or the Rejected the source already implies."""
    if raw.problem:
        return Rejected(raw.problem)
    if not isinstance(raw.caption, str) or not raw.caption.strip():
        return Rejected("empty_caption")
    return [read() for read in raw.images]


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
            # Channel-first copies ((n, 3, R, R), clips (n, frames, 3, R, R)): safetensors stores raw memory, so a
            # permuted view must be made contiguous.
            tensors[role] = torch.from_numpy(pixels).movedim(-1, -3).contiguous()
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
        # Samples per split let a reader choose a split's samples without reading the captions files.
        split_counts = Counter(split for _, _, split in self.pending if split is not None)
        self.shards.append({"tensors": f"{name}.safetensors", "captions": f"{name}.jsonl",
                            "num_samples": len(self.pending), "split_counts": dict(sorted(split_counts.items()))})
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


def frames_reader(fs, paths: list[str]) -> Callable[[], list[bytes]]:
    return lambda: [fs.cat_file(path) for path in paths]


def folder_source(fs, root: str, keep_pairs: bool, frames: int = 0) -> Source:
    if keep_pairs:
        raise SSPOError("keep_pairs needs losers, which a folder source lacks: use jsonl with 'loser' or parquet")
    if not fs.isdir(root):
        raise SSPOError(f"a folder source must be a directory: {root}")
    root = root.rstrip("/")
    files = set(fs.find(root))
    if frames:
        return clip_folder_source(fs, root, files)
    images = sorted(p for p in files if p.lower().endswith(IMAGE_EXTENSIONS))

    def samples(chosen: list[str]) -> Iterator[RawSample]:
        return captioned_samples(fs, root, files, chosen, lambda image: posixpath.splitext(image)[0],
                                 lambda image: file_reader(fs, image))

    return Source("folder", images, lambda chosen: (len(chosen), samples(chosen)))


def captioned_samples(fs, root: str, files: set[str], chosen: list[str], stem_of: Callable[[str], str],
                      reader_of: Callable[[str], Callable]) -> Iterator[RawSample]:
    """A folder's samples: each file (or frame folder) of `chosen` with the caption in the `.txt` named by its stem."""
    for path in chosen:
        name = path[len(root) + 1 :]
        caption_file = stem_of(path) + ".txt"
        if caption_file not in files:
            yield RawSample(name, None, None, problem="missing_caption")
            continue
        try:
            caption = fs.cat_file(caption_file).decode("utf-8")
        except UnicodeDecodeError:
            yield RawSample(name, None, None, problem="unreadable_caption")
            continue
        yield RawSample(name, caption, None, [reader_of(path)])


def clip_folder_source(fs, root: str, files: set[str]) -> Source:
    """Clips of a folder: animated files, and folders of frame images (in name order), each with `<name>.txt`."""
    frame_folders: dict[str, list[str]] = {}
    for path in files:
        if path.lower().endswith(IMAGE_EXTENSIONS) and posixpath.dirname(path) != root:
            frame_folders.setdefault(posixpath.dirname(path), []).append(path)
    clips = sorted([p for p in files if p.lower().endswith(CLIP_EXTENSIONS)] + list(frame_folders))

    def samples(chosen: list[str]) -> Iterator[RawSample]:
        return captioned_samples(
            fs, root, files, chosen,
            lambda clip: clip if clip in frame_folders else posixpath.splitext(clip)[0],
            lambda clip: frames_reader(fs, sorted(frame_folders[clip])) if clip in frame_folders
            else file_reader(fs, clip))

    return Source("folder", clips, lambda chosen: (len(chosen), samples(chosen)))


def jsonl_source(fs, root: str, keep_pairs: bool) -> Source:
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

    def samples(chosen: list) -> Iterator[RawSample]:
        for number, record in chosen:
            paths = [record["file"], record["loser"]] if keep_pairs else [record["file"]]
            split = record.get("split")
            yield RawSample(
                f"{posixpath.basename(metadata)} line {number} ({record['file']})",
                record["caption"],
                None if split is None else str(split),
                [reader(path) for path in paths],
            )

    return Source("jsonl", records, lambda chosen: (len(chosen), samples(chosen)))


def parquet_files(fs, root: str) -> list[str]:
    if fs.isfile(root):
        return [root]
    return sorted(p for p in fs.find(root) if p.endswith(".parquet"))


def parquet_split(root: str, path: str) -> str | None:
    """The split a parquet file's name or folder names, as Hugging Face lays datasets out: `train-00000-of-00645-
    <hash>.parquet` (Pick-a-Pic v2's `data/` folder), `test.parquet`, `validation/0000.parquet`; None otherwise."""
    name = posixpath.basename(path)
    sharded = SHARDED_SPLIT_FILE.match(name)
    if sharded:
        return sharded["split"]
    stem = name.removesuffix(".parquet")
    if stem in SPLIT_NAMES:
        return stem
    folders = posixpath.dirname(path[len(root.rstrip("/")) + 1:]).split("/")
    return next((folder for folder in reversed(folders) if folder in SPLIT_NAMES), None)


def parquet_source(fs, root: str, keep_pairs: bool) -> Source:
    files = parquet_files(fs, root)
    if not files:
        raise SSPOError(f"no .parquet files in {root}")
    # A single file names its split by its name alone: its folders are not part of the source.
    base = posixpath.dirname(root) if fs.isfile(root) else root

    def read(chosen: list[str]) -> tuple[int, Iterator[RawSample]]:
        total = 0
        # Every chosen file's columns are checked before any image is processed, so a format error stops at once.
        for path in chosen:
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
        return total, samples(chosen)

    def samples(chosen: list[str]) -> Iterator[RawSample]:
        for path in chosen:
            split = parquet_split(base, path)
            with fs.open(path, "rb") as f:
                row = 0
                batches = pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(PARQUET_COLUMNS))
                for batch in batches:
                    columns = [batch.column(column).to_pylist() for column in PARQUET_COLUMNS]
                    for caption, image_0, image_1, label_0 in zip(*columns):
                        name = f"{posixpath.basename(path)} row {row}"
                        yield pair_sample(name, caption, split, image_0, image_1, label_0, keep_pairs)
                        row += 1

    return Source("parquet", files, read)


def pair_sample(name: str, caption, split: str | None, image_0, image_1, label_0, keep_pairs: bool) -> RawSample:
    if label_0 is None or math.isnan(label_0):
        return RawSample(name, caption, split, problem="missing_label")
    if not 0 <= label_0 <= 1:
        return RawSample(name, caption, split, problem="bad_label")
    if label_0 == 0.5:
        return RawSample(name, caption, split, problem="tie")
    winner, loser = (image_0, image_1) if label_0 > 0.5 else (image_1, image_0)
    images = (winner, loser) if keep_pairs else (winner,)
    return RawSample(name, caption, split, [lambda data=data: data for data in images])


SOURCES = {"folder": folder_source, "jsonl": jsonl_source, "parquet": parquet_source}


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0
