"""Images in: one loader for every edge (Python API, CLI, server) and the vision graph's feeds.

`load_image` takes a PIL image, an (H, W, 3|4) uint8 array or a path and returns an RGB image or
one `UserError`; `prepare_image` turns it into the `vision` graph's feeds (Qwen2.5-VL
preprocessing in `image_preprocess`, window-ordered feeds in `vision_feeds`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from runtime.errors import UserError, UserTypeError
from runtime.host.image_preprocess import MAX_ASPECT_RATIO, preprocess_image
from runtime.host.vision_feeds import vision_feeds

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before resizing
MAX_NEW_TOKENS = 1 << 16
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # grayscale PNG/TIFF of 16 bits


def load_image(image) -> Image.Image:
    """A PIL image, an (H, W, 3|4) uint8 array or a path, as an RGB image, with clear errors.

    16-bit grayscale images are scaled to 8 bits (not clipped, which would turn most of the
    range white)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise UserError(f"{path} is a folder, not an image")
        try:
            with Image.open(path) as f:
                if f.width * f.height > MAX_IMAGE_PIXELS:
                    raise UserError(
                        f"{path} is {f.width}x{f.height} px; at most {MAX_IMAGE_PIXELS} "
                        "pixels are accepted"
                    )
                f.load()
                image = f.copy()
        except (OSError, Image.DecompressionBombError) as err:
            raise UserError(f"cannot read an image from {path}: {err}") from err
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise UserError(
                f"an image array must be (H, W, 3) or (H, W, 4) uint8, got {image.shape} "
                f"{image.dtype}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UserTypeError(
            f"image must be a PIL image, an array or a path, got {type(image).__name__}"
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
