"""The toy video world: 8-frame 32×32 clips of one coloured shape moving in one direction, with prompts that describe
them ("a red circle moving left").

Colours and shapes are the image world's. A clip is a uint8 array of shape (frames, height, width, 3), the layout
video pipelines return with `output_type="np"`. Train and held-out are split by attribute *combination*: every pair of
attribute values of a held-out clip also appears in train, so held-out prompts test composition, not memory.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageSequence, UnidentifiedImageError

from sspo.errors import SSPOError
from sspo.toy.world import COLORS, RESOLUTION, SHAPES

# Image y points down, so "up" moves toward row 0.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ATTRIBUTES = ("color", "shape", "direction")
NUM_FRAMES = 8
SUPERSAMPLING = 4  # draw large and downsample for anti-aliased edges, as the image world does
EXTENT = 1.15  # the farthest a shape reaches from its centre, in radii (the triangle's apex)
EDGE_MARGIN = 1.0  # pixels kept between a shape and the frame's edge, so it is never cut
FRAME_MS = 100  # a GIF stores durations in hundredths of a second, so this one is exact


@dataclass(frozen=True)
class VideoScene:
    color: str
    shape: str
    direction: str

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"

    def as_dict(self) -> dict:
        return {"color": self.color, "shape": self.shape, "direction": self.direction}


VALUES = {"color": tuple(COLORS), "shape": SHAPES, "direction": tuple(DIRECTIONS)}


def all_scenes() -> list[VideoScene]:
    return [VideoScene(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def is_heldout(scene: VideoScene) -> bool:
    """Every fifth combination on a diagonal: 10 of 48, and each pair of values still appears in train."""
    index = sum(VALUES[name].index(getattr(scene, name)) for name in ATTRIBUTES)
    return index % 5 == 0


def split_scenes(split: str) -> list[VideoScene]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    return [s for s in all_scenes() if is_heldout(s) == (split == "heldout")]


def parse_prompt(prompt: str) -> VideoScene | None:
    """The scene a prompt describes, or None for text outside the toy grammar."""
    for scene in all_scenes():
        if scene.prompt == prompt.strip().lower():
            return scene
    return None


def vocabulary() -> list[str]:
    return sorted({w for scene in all_scenes() for w in scene.prompt.split()})


def draw_frame(shape: str, rgb: tuple, centre: tuple[float, float], radius: float, grey: int,
               resolution: int) -> np.ndarray:
    """One (H, W, 3) uint8 frame: the shape at `centre` (pixels) on a grey background, drawn as the image world does."""
    size = resolution * SUPERSAMPLING
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    cx, cy, r = centre[0] * SUPERSAMPLING, centre[1] * SUPERSAMPLING, radius * SUPERSAMPLING
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        half = r * 0.9
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=rgb)
    else:
        r *= EXTENT
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(points, fill=rgb)
    return np.asarray(image.resize((resolution, resolution), Image.LANCZOS))


def render(scene: VideoScene, rng: np.random.Generator, resolution: int = RESOLUTION,
           num_frames: int = NUM_FRAMES) -> np.ndarray:
    """The clip as (frames, H, W, 3) uint8, with jitter in size, background grey, path length and placement.

    The shape moves at constant speed along the direction's axis over 80–100 % of the room it has there; its
    position across that axis is fixed for the clip.
    """
    radius = rng.uniform(0.16, 0.2) * resolution
    grey = int(rng.integers(200, 246))
    low = radius * EXTENT + EDGE_MARGIN
    high = resolution - low
    travel = rng.uniform(0.8, 1.0) * (high - low)
    start = low + rng.uniform(0.0, high - low - travel)
    across = rng.uniform(low, high)
    dx, dy = DIRECTIONS[scene.direction]
    along = start + travel * np.linspace(0.0, 1.0, num_frames)
    if dx + dy < 0:
        along = along[::-1]
    centres = [(a, across) if dx else (across, a) for a in along]
    rgb = COLORS[scene.color]
    return np.stack([draw_frame(scene.shape, rgb, centre, radius, grey, resolution) for centre in centres])


def with_one_attribute_wrong(scene: VideoScene, rng: np.random.Generator) -> VideoScene:
    attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    wrong = [value for value in VALUES[attribute] if value != getattr(scene, attribute)]
    return VideoScene(**{**scene.as_dict(), attribute: wrong[rng.integers(len(wrong))]})


def write_clip(clip: np.ndarray, path: Path) -> None:
    """Save a (frames, H, W, 3) uint8 clip as a lossless GIF: each frame with its own exact palette."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"a clip is a (frames, H, W, 3) uint8 array, not {clip.dtype} of shape {clip.shape}")
    frames = []
    for number, frame in enumerate(clip):
        colors, indices = np.unique(frame.reshape(-1, 3), axis=0, return_inverse=True)
        if len(colors) > 256:
            raise ValueError(f"a GIF frame holds at most 256 colours; frame {number} has {len(colors)}")
        image = Image.fromarray(indices.reshape(frame.shape[:2]).astype(np.uint8), mode="P")
        image.putpalette(colors.astype(np.uint8).tobytes())
        frames.append(image)
    # optimize=False keeps each palette as given
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], optimize=False, loop=0,
                   duration=FRAME_MS)


def read_clip(path: Path | str) -> np.ndarray:
    """A GIF's frames as a (frames, H, W, 3) uint8 array.

    The GIF writer merges repeated frames into one that lasts longer, so each frame counts FRAME_MS of duration.
    """
    try:
        with Image.open(path) as image:
            frames = []
            for frame in ImageSequence.Iterator(image):
                repeats = max(1, round(frame.info.get("duration", FRAME_MS) / FRAME_MS))
                frames += [np.asarray(frame.convert("RGB"))] * repeats
            return np.stack(frames)
    except FileNotFoundError:
        raise SSPOError(f"not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise SSPOError(f"{path} is not a readable GIF clip: {err}") from None


def generate(output_dir: Path, samples_per_scene: int, seed: int) -> dict:
    """Write clips/ (GIFs) and metadata.jsonl (file, caption, attributes, split) for every scene of both splits.

    Each clip also gets a `loser`: the same prompt rendered with one attribute wrong, for paired objectives (dpo).
    """
    output_dir = Path(output_dir)
    (output_dir / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index, (scene, _) in enumerate(itertools.product(all_scenes(), range(samples_per_scene))):
        name, loser = f"clips/{index:06d}.gif", f"clips/{index:06d}-loser.gif"
        write_clip(render(scene, rng), output_dir / name)
        write_clip(render(with_one_attribute_wrong(scene, rng), rng), output_dir / loser)
        split = "heldout" if is_heldout(scene) else "train"
        lines.append({"file": name, "loser": loser, "caption": scene.prompt, **scene.as_dict(), "split": split})
    with open(output_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return {"num_clips": len(lines), "num_scenes": len(all_scenes()), "samples_per_scene": samples_per_scene,
            "num_frames": NUM_FRAMES, "resolution": RESOLUTION}
