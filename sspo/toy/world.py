"""The toy world: 32×32 images of one coloured shape at one position, with prompts that describe them.

Train and held-out are split by attribute *combination*, so held-out prompts test composition, not memory. On
request a validation split is carved out of the training combinations the same way (for choosing settings without
looking at held-out prompts), and a fraction of winners is drawn with one attribute wrong, as real preference data
holds winners that are only *preferred*: their losers then have a second attribute wrong.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
ATTRIBUTES = ("color", "shape", "position")
SPLITS = ("train", "validation", "heldout")
RESOLUTION = 32


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    position: str

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} {POSITION_PHRASES[self.position]}"

    def as_dict(self) -> dict:
        return {"color": self.color, "shape": self.shape, "position": self.position}


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p) for c, s, p in itertools.product(COLORS, SHAPES, POSITIONS)]


def combination_index(scene: Scene) -> int:
    return list(COLORS).index(scene.color) + SHAPES.index(scene.shape) + list(POSITIONS).index(scene.position)


def is_heldout(scene: Scene) -> bool:
    """Every fifth combination on a diagonal: each single attribute value still appears in train."""
    return combination_index(scene) % 5 == 0


def split_of(scene: Scene, validation: bool = False) -> str:
    """heldout, validation (with `validation`: the next diagonal, 12 combinations; every pair of attribute values
    still appears in train) or train."""
    if is_heldout(scene):
        return "heldout"
    return "validation" if validation and combination_index(scene) % 5 == 1 else "train"


def split_scenes(split: str) -> list[Scene]:
    """The scenes of a split; `train` is every combination that is neither held out nor, in a world rendered with
    a validation split, validation."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if split == "train":
        return [s for s in all_scenes() if split_of(s) == "train"]
    return [s for s in all_scenes() if split_of(s, validation=True) == split]


def parse_prompt(prompt: str) -> Scene | None:
    """The scene a prompt describes, or None for text outside the toy grammar."""
    for scene in all_scenes():
        if scene.prompt == prompt.strip().lower():
            return scene
    return None


def vocabulary() -> list[str]:
    words = {w for scene in all_scenes() for w in scene.prompt.split()}
    return sorted(words)


def render(scene: Scene, rng: np.random.Generator, resolution: int = RESOLUTION) -> Image.Image:
    """Draw the scene with jitter in position, size and background grey level."""
    scale = 4  # draw large and downsample for anti-aliased edges
    size = resolution * scale
    grey = int(rng.integers(200, 246))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene.position]
    cx = (cx + rng.uniform(-0.05, 0.05)) * size
    cy = (cy + rng.uniform(-0.05, 0.05)) * size
    radius = rng.uniform(0.16, 0.2) * size
    color = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif scene.shape == "square":
        half = radius * 0.9
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=color)
    else:
        r = radius * 1.15
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(points, fill=color)
    return image.resize((resolution, resolution), Image.LANCZOS)


def with_one_attribute_wrong(scene: Scene, rng: np.random.Generator, keep: str | None = None) -> Scene:
    """The scene with one attribute (never `keep`) changed to another value."""
    attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    while attribute == keep:
        attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    choices = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}[attribute]
    wrong = [value for value in choices if value != getattr(scene, attribute)]
    return Scene(**{**scene.as_dict(), attribute: wrong[rng.integers(len(wrong))]})


def wrong_attribute(drawn: Scene, scene: Scene) -> str:
    return next(a for a in ATTRIBUTES if getattr(drawn, a) != getattr(scene, a))


def generate(output_dir: Path, samples_per_scene: int, seed: int, validation: bool = False,
             winner_errors: float = 0.0) -> dict:
    """Write images/ and metadata.jsonl (file, caption, attributes, split) for every scene of all splits.

    Each image also gets a `loser`: the same prompt rendered with one attribute wrong, for paired objectives (dpo).
    With `winner_errors` > 0 that fraction of winners is drawn with one attribute wrong (named in `winner_wrong`)
    and its loser with that one and a second wrong; the caption still names the scene.
    """
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index, (scene, _) in enumerate(itertools.product(all_scenes(), range(samples_per_scene))):
        name, loser = f"images/{index:06d}.png", f"images/{index:06d}-loser.png"
        # drawn only when asked for, so the default world stays the same image for image
        flawed = winner_errors > 0 and rng.random() < winner_errors
        drawn = with_one_attribute_wrong(scene, rng) if flawed else scene
        render(drawn, rng).save(output_dir / name)
        wrong = wrong_attribute(drawn, scene) if flawed else None
        render(with_one_attribute_wrong(drawn, rng, keep=wrong), rng).save(output_dir / loser)
        lines.append({"file": name, "loser": loser, "caption": scene.prompt, **scene.as_dict(),
                      "split": split_of(scene, validation), **({"winner_wrong": wrong} if flawed else {})})
    with open(output_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    # the default world's summary (and so its manifest) stays as it was
    flawed = {"flawed_winners": sum("winner_wrong" in line for line in lines)} if winner_errors else {}
    return {"num_images": len(lines), "num_scenes": len(all_scenes()), "samples_per_scene": samples_per_scene,
            **flawed}
