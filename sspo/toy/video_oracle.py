"""The video oracle: checks colour, shape and motion direction of the one object in a toy clip against the prompt's
scene.

It looks at nothing but the pixels. Colour and shape are the image oracle's per-frame verdicts, by majority over the
frames; direction comes from the object's centroid track. Each attribute is judged on its own, so a static or reversed
clip of the right object keeps its colour and shape and loses only its direction. A clip without one plausible object
(noise, blank) scores zero on every attribute.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from sspo.toy import oracle
from sspo.toy.video_world import ATTRIBUTES, DIRECTIONS, VideoScene

MIN_TRAVEL_FRACTION = 0.125  # net centroid motion, of the frame's width: 4 px at 32 px; renders travel 12 px or more
MAX_CROSS_RATIO = 0.5  # motion across the dominant axis, relative to motion along it
MIN_CONSISTENT_STEPS = 0.75  # of frame-to-frame steps that move the way the net motion does; shuffled frames fail it


def as_clip(clip: np.ndarray | list[Image.Image]) -> np.ndarray:
    """A clip as (frames, H, W, 3) float32 in [0, 255], from uint8 frames, [0, 1] floats or a list of PIL images."""
    if isinstance(clip, (list, tuple)) and clip and isinstance(clip[0], Image.Image):
        clip = np.stack([np.asarray(frame.convert("RGB")) for frame in clip])
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"a clip is a (frames, H, W, 3) array, not one of shape {clip.shape}")
    if np.issubdtype(clip.dtype, np.floating):
        return np.clip(clip, 0.0, 1.0).astype(np.float32) * 255.0
    return clip.astype(np.float32)


def centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) in pixels of the pixels that differ from the border's median colour as the image oracle's do."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    mask = np.abs(frame - np.median(border, axis=0)).max(axis=-1) > oracle.FOREGROUND_THRESHOLD
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def direction_of(track: np.ndarray, width: int) -> str | None:
    """The direction a (frames, 2) centroid track moves in, or None when it does not move steadily one way."""
    net = track[-1] - track[0]
    axis = int(np.argmax(np.abs(net)))
    along, across = net[axis], net[1 - axis]
    if abs(along) < MIN_TRAVEL_FRACTION * width or abs(across) > MAX_CROSS_RATIO * abs(along):
        return None
    steps = np.diff(track[:, axis])
    if np.mean(np.sign(steps) == np.sign(along)) < MIN_CONSISTENT_STEPS:
        return None
    unit = [0, 0]
    unit[axis] = int(np.sign(along))
    return next(name for name, vector in DIRECTIONS.items() if list(vector) == unit)


def detect(clip: np.ndarray | list[Image.Image]) -> dict:
    """The clip's object: colour and shape by majority over the frames where the image oracle finds one object (None
    when that is under half of them), direction from the centroid track (None unless every frame holds the object)."""
    frames = as_clip(clip)
    found = [oracle.detect(frame) for frame in frames]
    seen = [f for f in found if f is not None]
    result = {"color": None, "shape": None, "direction": None, "frames_detected": len(seen)}
    if 2 * len(seen) >= len(frames):
        for name in ("color", "shape"):
            result[name] = Counter(f[name] for f in seen).most_common(1)[0][0]
    if len(seen) == len(frames) > 1:
        result["direction"] = direction_of(np.stack([centroid(frame) for frame in frames]), frames.shape[2])
    return result


def score(clip: np.ndarray | list[Image.Image], scene: VideoScene) -> dict:
    """Per-attribute correctness (0 or 1) and their mean under "score"."""
    found = detect(clip)
    result = {name: float(found[name] == getattr(scene, name)) for name in ATTRIBUTES}
    result["score"] = sum(result[name] for name in ATTRIBUTES) / len(ATTRIBUTES)
    return result
