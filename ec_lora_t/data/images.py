"""Opening images the one way every stage does, and turning them into model input.

Ingest fully decodes each image once to prove it is usable; every later stage (captioning,
latents, evaluation) opens images through :func:`load_rgb_image`, which applies the EXIF
rotation and converts palette, RGBA, CMYK, greyscale and 16-bit images to RGB the same way
every time. :func:`image_to_pixel_values` is the one resize, crop and scaling to the VAE's
[-1, 1] input, so training images and generated images are read alike.
"""

from __future__ import annotations

import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default warning threshold (about 89.5 MPix, a 9459 x 9459 image).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class ImageRejected(ValueError):
    """An image file cannot be used; ``reason`` is a code from REJECT_REASONS."""

    def __init__(self, path: str | Path, reason: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = reason
        self.detail = message



_PIXEL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pixel_limit(max_image_pixels: int | None) -> Iterator[None]:
    """Make Pillow's decompression-bomb guard use our limit while opening one file.

    Pillow reads the limit from a module global; it raises by itself only above twice the
    limit, so the caller still compares the size with ``max_image_pixels``.
    """
    with _PIXEL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_image_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def load_rgb_image(path: str | Path, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image the one way every stage does: decoded, EXIF-upright, 8-bit RGB.

    ``max_image_pixels=None`` turns the decompression-bomb guard off, for stages that read
    images the ingest stage already checked against its own ``max_image_pixels``.

    * EXIF orientation is applied (phones store portraits as rotated landscapes).
    * Palette and greyscale images become RGB; transparency (RGBA, LA, palette with a
      transparent colour) is composited onto white, as Instagram shows it.
    * CMYK (print JPEGs) is converted by Pillow, which handles Adobe's inverted CMYK.
    * 16-bit greyscale is scaled to 8 bits rather than clipped.

    Raises :class:`ImageRejected` (``unreadable_image``, ``truncated_image`` or
    ``decompression_bomb``) naming the file.
    """
    try:
        # Only opening reads the header and checks the size; decoding happens outside the lock.
        with _pixel_limit(max_image_pixels):
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageRejected(path, "decompression_bomb", str(error)) from None
    except UnidentifiedImageError:
        raise ImageRejected(path, "unreadable_image", "not an image file Pillow can identify") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise ImageRejected(path, "unreadable_image", f"cannot open: {error.strerror}") from None
    with image:
        width, height = image.size
        if max_image_pixels is not None and width * height > max_image_pixels:
            raise ImageRejected(
                path,
                "decompression_bomb",
                f"{width}x{height} = {width * height} pixels is over max_image_pixels ({max_image_pixels})",
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageRejected(path, "truncated_image", f"pixel data is truncated or corrupt ({error})") from None
        return _to_rgb(_exif_upright(image))


def _exif_upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        # A broken EXIF block must not cost the image; it is then used as stored.
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        # (H, W) 16-bit range -> uint8; convert("L") alone would clip everything above 255.
        # Mode I (32-bit) holds 16-bit PNGs on some Pillow versions, or 8-bit values.
        pixels = np.asarray(image, dtype=np.float64)
        is_16bit = image.mode.startswith("I;16") or pixels.max(initial=0) > 255
        scale = 255.0 / 65535.0 if is_16bit else 1.0
        grey = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # (H, W) uint8 -> L -> RGB
    if image.mode != "RGB":
        return image.convert("RGB")
    return image.copy()


def pixels_to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return pixels.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bilinear) and centre-crop: the square RGB image the model sees."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized = image.convert("RGB").resize(
        (max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.Resampling.BILINEAR
    )
    left = (resized.width - resolution) // 2
    top = (resized.height - resolution) // 2
    return resized.crop((left, top, left + resolution, top + resolution))


def image_to_pixel_values(image: Image.Image, resolution: int) -> torch.Tensor:
    """`resize_and_crop`, then scaled to [-1, 1]: (3, R, R), the VAE's input."""
    return pixels_to_model_input(torch.from_numpy(np.array(resize_and_crop(image, resolution)))[None])[0]
