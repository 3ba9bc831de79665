"""The oracle: checks colour, shape and position of the one object in a toy image against the prompt's scene.

It looks at nothing but the pixels and the scene's attributes. An image without one plausible, uniformly coloured
object (noise, blank, smears) scores zero on every attribute.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sspo.toy.world import ATTRIBUTES, COLORS, POSITIONS, Scene

FOREGROUND_THRESHOLD = 60.0
MIN_AREA_FRACTION, MAX_AREA_FRACTION = 0.015, 0.3
MAX_COLOR_DISTANCE = 100.0
MAX_COLOR_SPREAD = 45.0


def detect(image: Image.Image | np.ndarray) -> dict | None:
    """The detected object's attributes, or None when the image holds no plausible single object."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(pixels - background).max(axis=-1) > FOREGROUND_THRESHOLD
    area = int(mask.sum())
    if not MIN_AREA_FRACTION * height * width <= area <= MAX_AREA_FRACTION * height * width:
        return None
    object_pixels = pixels[mask]
    if object_pixels.std(axis=0).mean() > MAX_COLOR_SPREAD:
        return None
    mean_color = object_pixels.mean(axis=0)
    distances = {name: float(np.linalg.norm(mean_color - np.array(rgb))) for name, rgb in COLORS.items()}
    color = min(distances, key=distances.get)
    if distances[color] > MAX_COLOR_DISTANCE:
        color = None
    ys, xs = np.nonzero(mask)
    centre = np.array([(xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height])
    position = min(POSITIONS, key=lambda p: float(np.linalg.norm(centre - np.array(POSITIONS[p]))))
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = area / box_area
    shape = "square" if fill > 0.92 else "circle" if fill > 0.69 else "triangle"
    return {"color": color, "shape": shape, "position": position, "fill": fill, "area": area}


def score(image: Image.Image | np.ndarray, scene: Scene) -> dict:
    """Per-attribute correctness (0 or 1) and their mean under "score"."""
    found = detect(image)
    result = {name: float(found is not None and found[name] == getattr(scene, name)) for name in ATTRIBUTES}
    result["score"] = sum(result[name] for name in ATTRIBUTES) / len(ATTRIBUTES)
    return result
