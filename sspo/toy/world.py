"""The toy world: 32×32 images of one coloured shape at one position, with prompts that describe them.

Train and held-out are split by attribute *combination*, so held-out prompts test composition, not memory.
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


def is_heldout(scene: Scene) -> bool:
    """Every fifth combination on a diagonal: each single attribute value still appears in train."""
    index = list(COLORS).index(scene.color) + SHAPES.index(scene.shape) + list(POSITIONS).index(scene.position)
    return index % 5 == 0


def split_scenes(split: str) -> list[Scene]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    return [s for s in all_scenes() if is_heldout(s) == (split == "heldout")]


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


def with_one_attribute_wrong(scene: Scene, rng: np.random.Generator) -> Scene:
    attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    choices = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}[attribute]
    wrong = [value for value in choices if value != getattr(scene, attribute)]
    return Scene(**{**scene.as_dict(), attribute: wrong[rng.integers(len(wrong))]})


def generate(output_dir: Path, samples_per_scene: int, seed: int) -> dict:
    """Write images/ and metadata.jsonl (file, caption, attributes, split) for every scene of both splits.

    Each image also gets a `loser`: the same prompt rendered with one attribute wrong, for paired objectives (dpo).
    """
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index, (scene, _) in enumerate(itertools.product(all_scenes(), range(samples_per_scene))):
        name, loser = f"images/{index:06d}.png", f"images/{index:06d}-loser.png"
        render(scene, rng).save(output_dir / name)
        render(with_one_attribute_wrong(scene, rng), rng).save(output_dir / loser)
        split = "heldout" if is_heldout(scene) else "train"
        lines.append({"file": name, "loser": loser, "caption": scene.prompt, **scene.as_dict(), "split": split})
    with open(output_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return {"num_images": len(lines), "num_scenes": len(all_scenes()), "samples_per_scene": samples_per_scene}
