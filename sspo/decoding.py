"""Decoding and resizing of source images and clips: the CPU work of `sspo prepare`, done by its worker processes.
Kept free of torch and of storage, so that a worker starts in a fraction of a second.

Clips are animated images decoded with Pillow (GIF, as the toy video world writes them; animated PNG and WebP too)
or video files (MP4, WebM, MOV, MKV, AVI) decoded with PyAV: the FFmpeg bindings torchvision's video reader uses,
whose wheels carry FFmpeg itself, so no system FFmpeg is needed. PyAV is imported only when a video file is read."""

from __future__ import annotations

import io
import struct
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL reports undecodable input through many exception types, depending on the codec and where it breaks.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # the orientations that swap width and height


class Rejected(Exception):
    """Why a sample is unusable: one of sspo.prepare.REASONS, with a detail where there is one."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # workers send it back to the process that writes the shards
        return Rejected, (self.reason, self.detail)


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
    try:
        refuse_larger_than(max_pixels, *image.size)
    except Rejected:
        image.close()
        raise
    return image


def refuse_larger_than(max_pixels: int, width: int, height: int) -> None:
    if width * height > max_pixels:
        raise Rejected("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")


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
        image = as_rgb(ImageOps.exif_transpose(opened))
    pixels, top, left = square_crop(image, resolution)
    return PreparedImage(pixels, (*original_size, top, left))


def as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Transparent areas become white instead of whatever colour happens to be hidden under them.
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, "white")
        image.alpha_composite(rgba)
    return image.convert("RGB")


def square_crop(image: Image.Image, resolution: int) -> tuple[np.ndarray, int, int]:
    """(pixels, crop top, crop left): the shorter side resized to `resolution`, then the center square."""
    scale = resolution / min(image.size)
    width = max(resolution, round(image.width * scale))
    height = max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution))), top, left


def to_clip(data: bytes, resolution: int, max_pixels: int, frames: int) -> PreparedImage:
    """The first `frames` frames of an animated image (GIF, or animated PNG/WebP), each as to_pixels makes an image:
    pixels (frames, R, R, 3). Fewer frames are Rejected ("short_clip").

    A GIF writer stores a run of identical frames as one frame that lasts longer, so a frame counts as its duration
    over the clip's shortest one.
    """
    try:
        opened = open_image(data, max_pixels)
    except UnidentifiedImageError:
        return video_to_clip(data, resolution, max_pixels, frames)
    with opened:
        original_size = opened.size[::-1]
        durations = []
        for index in range(getattr(opened, "n_frames", 1)):
            opened.seek(index)
            durations.append(opened.info.get("duration") or 0)
        unit = min((d for d in durations if d > 0), default=0)
        counts = [max(1, round(d / unit)) if unit else 1 for d in durations]
        if sum(counts) < frames:
            raise Rejected("short_clip", f"{sum(counts)} frames, fewer than frames {frames}")
        clip = []
        for index, count in enumerate(counts):
            opened.seek(index)
            pixels, top, left = square_crop(as_rgb(opened), resolution)
            clip += [pixels] * count
            if len(clip) >= frames:
                break
    return PreparedImage(np.stack(clip[:frames]), (*original_size, top, left))


def video_to_clip(data: bytes, resolution: int, max_pixels: int, frames: int) -> PreparedImage:
    """The first `frames` decoded frames of a video file's first video stream, as to_clip makes them (frames are
    taken as decoded, at the file's own rate)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise Rejected("corrupt_image", "no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            refuse_larger_than(max_pixels, width, height)
            clip = []
            for frame in container.decode(stream):
                pixels, top, left = square_crop(frame.to_image(), resolution)
                clip.append(pixels)
                if len(clip) == frames:
                    return PreparedImage(np.stack(clip), (height, width, top, left))
    except av.FFmpegError as err:
        raise Rejected("corrupt_image", str(err)) from None
    raise Rejected("short_clip", f"{len(clip)} frames, fewer than frames {frames}")


def frames_to_clip(frame_files: list[bytes], resolution: int, max_pixels: int, frames: int) -> PreparedImage:
    """The first `frames` of a clip's frame images, each as to_pixels makes it; fewer are Rejected ("short_clip")."""
    if len(frame_files) < frames:
        raise Rejected("short_clip", f"{len(frame_files)} frames, fewer than frames {frames}")
    prepared = [to_pixels(data, resolution, max_pixels) for data in frame_files[:frames]]
    return PreparedImage(np.stack([frame.pixels for frame in prepared]), prepared[0].geometry)


def decode_sample(images: list[bytes | list[bytes] | None] | Rejected, resolution: int, max_pixels: int,
                  frames: int = 0) -> list[PreparedImage] | Rejected:
    """The images (or, with `frames`, clips) decoded and resized, or the Rejected that says why the sample is
    unusable."""
    if isinstance(images, Rejected):
        return images
    prepared = []
    for data in images:
        if data is None:
            return Rejected("missing_image")
        try:
            if isinstance(data, list):  # a folder of frame images
                prepared.append(frames_to_clip(data, resolution, max_pixels, frames))
            elif frames:
                prepared.append(to_clip(data, resolution, max_pixels, frames))
            else:
                prepared.append(to_pixels(data, resolution, max_pixels))
        except Rejected as rejected:
            return rejected
        except DECODE_ERRORS:
            return Rejected("corrupt_image")
    return prepared


def decode_chunk(payloads: list, resolution: int, max_pixels: int, frames: int = 0) -> list:
    """decode_sample of each payload: the work of a worker process."""
    return [decode_sample(images, resolution, max_pixels, frames) for images in payloads]
