"""Prepare throughput: images per second that `sspo prepare` decodes, resizes and writes with 1 and with 2 worker
processes, from a Pick-a-Pic-shaped parquet file of camera-sized JPEGs made here (so nothing is downloaded).

Decoding and resizing are the CPU work that workers share; reading the source and writing shards stay in the main
process. On a shared machine the ratio is noisy: run it on a quiet one.

Usage: python bench/prepare_throughput.py [--images 192] [--size 768] [--resolution 256] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"


def photo_like_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth colour field with some grain: compresses like a photograph, unlike pure noise."""
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    colours = rng.uniform(0, 255, (2, 2, 3)).astype(np.float32)
    field = (colours[0, 0] * (1 - ramp)[:, None, None] * (1 - ramp)[None, :, None]
             + colours[0, 1] * (1 - ramp)[:, None, None] * ramp[None, :, None]
             + colours[1, 0] * ramp[:, None, None] * (1 - ramp)[None, :, None]
             + colours[1, 1] * ramp[:, None, None] * ramp[None, :, None])
    pixels = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_source(path: Path, images: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    jpegs = [photo_like_jpeg(rng, size) for _ in range(images + 1)]
    table = pa.table({"caption": [f"prompt {i}" for i in range(images)], "jpg_0": jpegs[:-1],
                      "jpg_1": jpegs[1:], "label_0": [1.0] * images})
    pq.write_table(table, path)
    return path


def prepare_throughput(workdir: Path, images: int = 192, size: int = 768, resolution: int = 256,
                       workers: tuple[int, ...] = (1, 2)) -> dict[int, float]:
    """Images per second of `sspo prepare` with each number of workers; prints one line per number."""
    # Imported here: worker processes import the main script again, and this keeps torch out of that.
    from sspo.prepare import prepare

    source = write_source(workdir / "source.parquet", images, size)
    rates = {}
    for count in workers:
        start = time.perf_counter()
        summary = prepare(str(source), str(workdir / f"prepared-{count}"), resolution=resolution, workers=count)
        rates[count] = summary["num_samples"] / (time.perf_counter() - start)
        print(f"prepare, {count} worker(s): {rates[count]:.1f} images/s ({images} {size}x{size} JPEGs to "
              f"{resolution}x{resolution}; {rates[count] / rates[workers[0]]:.2f}x of {workers[0]} worker(s))")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=768, help="side of the source JPEGs")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workdir", help="(default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sspo-bench-prepare-") as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        rates = prepare_throughput(workdir, args.images, args.size, args.resolution)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prepare_throughput.json").write_text(json.dumps({
        "images": args.images, "source_size": args.size, "resolution": args.resolution,
        "images_per_second": {str(workers): rate for workers, rate in rates.items()},
        "two_workers_over_one": rates[2] / rates[1]}, indent=2))
    print(f"written to {RESULTS / 'prepare_throughput.json'}")


if __name__ == "__main__":
    main()
