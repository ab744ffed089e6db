"""Qwen2.5-VL image preprocessing in numpy + PIL (the input of the ``vision`` graph).

Reproduces transformers' PIL-backend ``Qwen2VLImageProcessorPil`` (the slow, torch-free one;
Qwen2.5-VL uses the Qwen2-VL processor): convert to RGB (alpha composited on white), resize with
PIL bicubic to a size from :func:`smart_resize` (multiples of ``patch_size * merge_size``, pixel
count within ``[min_pixels, max_pixels]``), rescale by 1/255, normalize with the OpenAI CLIP
mean/std, repeat the frame ``temporal_patch_size`` times, and flatten into patches in the
merge-aware order the vision tower expects (each ``merge x merge`` block of patches contiguous).

The defaults are transformers' class defaults (``min_pixels = 56*56``, ``max_pixels = 28*28*1280``,
at most 1280 merged tokens). Qwen2.5-VL-*-Instruct's ``preprocessor_config.json`` raises
``max_pixels`` to 12845056; pass the checkpoint's values where they matter.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(height, width)``: both multiples of ``factor``, area within
    ``[min_pixels, max_pixels]`` (up to rounding to ``factor``), aspect ratio kept as well as
    possible.

    Same arithmetic as transformers' ``smart_resize`` (Python's round-half-to-even included).
    Tiny images are scaled up (transformers 5.x no longer rejects sides smaller than ``factor``).

    Raises:
        ValueError: for a non-positive size or factor, or an aspect ratio above 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if factor <= 0 or min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(
            f"need factor > 0 and 0 < min_pixels <= max_pixels, got factor={factor}, "
            f"min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image {height}x{width} (HxW) has aspect ratio {ratio:.1f}; at most "
            f"{MAX_ASPECT_RATIO} is allowed"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_rgb_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB, transparency composited onto white (as transformers)."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL.Image or np.ndarray, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"array images must be uint8 (H, W[, C]) in 0..255, got dtype {image.dtype}"
        )
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W, 1)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"array images must be (H, W), (H, W, 1|3|4) channels-last, got {image.shape}"
        )
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)  # (H, W, 3)
    if image.shape[2] == 4:
        alpha = image[..., 3:4] / 255  # (H, W, 1) float64
        composite = alpha * image[..., :3] + (1 - alpha) * 255  # (H, W, 3) onto white
        return np.round(composite).astype(np.uint8)
    return image


def _patchify(
    image: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int
) -> np.ndarray:
    """(C, H, W) float32 -> (grid_h * grid_w, C * T * P * P) in merge-block order."""
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    x = image.reshape(
        c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)  # (N, C*T*P*P)


def preprocess_image(
    image: Image.Image | np.ndarray,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn one image into the Qwen2.5-VL vision tower's flattened patches.

    Args:
        image: a PIL image (any mode) or a uint8 array ``(H, W)`` / ``(H, W, 1|3|4)``,
            channels last.

    Returns:
        pixel_values: float32 ``(grid_h * grid_w, 3 * temporal_patch_size * patch_size**2)``.
        grid_thw: int64 ``(1, 3)``, ``[[1, grid_h, grid_w]]`` in patches (the LLM sees
        ``grid_h * grid_w / merge_size**2`` image tokens).
    """
    if min(patch_size, temporal_patch_size, merge_size) < 1:
        raise ValueError(
            f"patch_size, temporal_patch_size and merge_size must be >= 1, got {patch_size}, "
            f"{temporal_patch_size}, {merge_size}"
        )
    rgb = _to_rgb_uint8(image)  # (H, W, 3) uint8
    height, width = rgb.shape[:2]
    new_h, new_w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    resized = Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    logger.debug("qwen image %dx%d -> %dx%d", height, width, new_h, new_w)

    x = np.asarray(resized).transpose(2, 0, 1)  # (3, h, w) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # (3, h, w), as transformers
    mean32 = np.asarray(mean, np.float32)[:, None, None]  # (3, 1, 1)
    std32 = np.asarray(std, np.float32)[:, None, None]  # (3, 1, 1)
    x = (x - mean32) / std32  # (3, h, w) float32

    pixel_values = _patchify(x, patch_size, temporal_patch_size, merge_size)  # (N, 3*T*P*P)
    grid_thw = np.array([[1, new_h // patch_size, new_w // patch_size]], dtype=np.int64)  # (1, 3)
    return np.ascontiguousarray(pixel_values), grid_thw
