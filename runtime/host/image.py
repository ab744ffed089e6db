"""Images in: one loader for every edge (Python API, CLI, server) and the vision graph's feeds.

`load_image` takes a PIL image, an (H, W, 3|4) uint8 array, a path or an image file's bytes
(PNG, JPEG, WebP, GIF, BMP or TIFF) and returns an RGB image or one `UserError` (every decoder
failure, whatever Pillow raised);
`prepare_image` turns it into the `vision` graph's feeds (Qwen2.5-VL preprocessing in
`image_preprocess`, window-ordered feeds in `vision_feeds`).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.errors import UserError, UserTypeError
from runtime.host.image_preprocess import MAX_ASPECT_RATIO, preprocess_image
from runtime.host.vision_feeds import vision_feeds

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before resizing
MAX_NEW_TOKENS = 1 << 16
# The decoders a file may reach: the common, well-kept formats. Pillow's others (EPS runs
# Ghostscript; DDS, SGI, PSD, ... see few files and more bugs) are refused as unknown.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # grayscale PNG/TIFF of 16 bits


def load_image(image, *, what: str | None = None) -> Image.Image:
    """A PIL image, an (H, W, 3|4) uint8 array, a path or the bytes of an image file, as an RGB
    image; any failure is one `UserError` naming `what` (default: the path, or "the image").

    Decoding is Pillow's, and Pillow reports a malformed file with many exception types
    (`OSError`, `SyntaxError`, `ValueError` for an oversized text chunk, `struct.error`,
    `EOFError`, `DecompressionBombError`, ...): every exception out of opening, decoding and
    converting the file is the same refusal, so a new kind of broken file cannot end in a
    traceback. 16-bit grayscale images are scaled to 8 bits (not clipped, which would turn most
    of the range white)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        what = what or f"an image from {path}"
        if path.is_dir():
            raise UserError(f"{path} is a folder, not an image")
        if not path.is_file():
            raise UserError(f"cannot read {what}: no such file")
        image = _decode(path, what)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        what = what or "the image"
        image = _decode(io.BytesIO(bytes(image)), what)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise UserError(
                f"an image array must be (H, W, 3) or (H, W, 4) uint8, got {image.shape} "
                f"{image.dtype}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UserTypeError(
            f"image must be a PIL image, an array, a path or bytes, got {type(image).__name__}"
        )
    try:
        return _to_rgb(image)
    except UserError:
        raise
    except Exception as err:  # an image Pillow opened but cannot convert (mode, bad data)
        raise UserError(f"cannot read {what or 'the image'}: {_reason(err)}") from err


def _decode(source, what: str) -> Image.Image:
    try:
        with Image.open(source, formats=FORMATS) as f:
            if f.width * f.height > MAX_IMAGE_PIXELS:
                raise UserError(
                    f"cannot read {what}: it is {f.width}x{f.height} px; at most "
                    f"{MAX_IMAGE_PIXELS} pixels are accepted"
                )
            f.load()
            return f.copy()
    except UserError:
        raise
    except Exception as err:  # every decoder failure, whatever Pillow raised for it
        raise UserError(f"cannot read {what}: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # Pillow's
    text = " ".join(text.split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise UserError(
            f"an image of {image.width}x{image.height} px; at most {MAX_IMAGE_PIXELS} pixels "
            "are accepted"
        )
    if image.mode in _SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.float64)  # (H, W) in [0, 65535]
        image = Image.fromarray((np.clip(wide, 0, 65535) / 257).round().astype(np.uint8), "L")
    return image.convert("RGB")


def prepare_image(gen, image) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess an image for the vision graph: (image_embeds feeds, grid_thw)."""
    v = gen.config["backbone"]["vision"]
    image = load_image(image)
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise UserError(
            f"image of {image.width}x{image.height} px is too elongated; the aspect ratio "
            f"must be at most {MAX_ASPECT_RATIO}"
        )
    if min(image.size) < v["patch_size"]:
        raise UserError(
            f"image of {image.width}x{image.height} px is smaller than one "
            f"{v['patch_size']}x{v['patch_size']} vision patch"
        )
    pixels, grid = preprocess_image(
        image,
        patch_size=v["patch_size"],
        temporal_patch_size=v["temporal_patch_size"],
        merge_size=v["spatial_merge_size"],
        min_pixels=v["min_pixels"],
        max_pixels=v["max_pixels"],
    )
    feeds = vision_feeds(
        pixels,
        grid,
        spatial_merge_size=v["spatial_merge_size"],
        window_size=v["window_size"],
        patch_size=v["patch_size"],
    )
    feeds["pixel_values"] = feeds["pixel_values"].astype(gen.io_dtype)
    return feeds, grid
