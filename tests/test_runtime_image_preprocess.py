"""runtime.host.image_preprocess against transformers' PIL-backend Qwen2-VL image processor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from runtime.host import image_preprocess
from runtime.host.image_preprocess import preprocess_image, smart_resize

TINY_PATCHES = dict(patch_size=8, merge_size=2, min_pixels=16 * 16, max_pixels=64 * 64)


def _reference(image, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    out = Qwen2VLImageProcessorPil(**kwargs)(images=image, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_constants_match_transformers() -> None:
    assert image_preprocess.OPENAI_CLIP_MEAN == tuple(OPENAI_CLIP_MEAN)
    assert image_preprocess.OPENAI_CLIP_STD == tuple(OPENAI_CLIP_STD)
    size = Qwen2VLImageProcessorPil().size
    assert (size["shortest_edge"], size["longest_edge"]) == (
        image_preprocess.MIN_PIXELS,
        image_preprocess.MAX_PIXELS,
    )


@pytest.mark.parametrize(
    ("height", "width", "kwargs"),
    [
        (224, 224, {}),  # already a multiple of 28
        (300, 517, {}),  # non-square, rounded
        (517, 300, {}),
        (37, 91, {}),  # below min_pixels: scaled up
        (10, 13, {}),  # sides below the factor
        (1000, 1500, {}),  # above max_pixels: scaled down
        (97, 61, TINY_PATCHES),  # tiny custom patch config
        (200, 40, TINY_PATCHES),
    ],
)
def test_preprocess_equals_transformers(height: int, width: int, kwargs: dict) -> None:
    array = _random_rgb(height, width, seed=height * width)
    ref_pixels, ref_grid = _reference(Image.fromarray(array), **kwargs)
    for image in (Image.fromarray(array), array):
        pixels, grid = preprocess_image(image, **kwargs)
        assert pixels.dtype == np.float32 and grid.dtype == np.int64
        assert pixels.shape == ref_pixels.shape
        np.testing.assert_array_equal(grid, ref_grid)
        np.testing.assert_allclose(pixels, ref_pixels, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK"])
def test_preprocess_modes_equal_transformers(mode: str) -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (70, 45, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, mode="RGBA").convert(mode)
    if mode == "P":
        image.info["transparency"] = 0
    ref_pixels, ref_grid = _reference(image)
    pixels, grid = preprocess_image(image)
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_allclose(pixels, ref_pixels, rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels", [None, 1, 4])
def test_preprocess_arrays_equal_transformers(channels: int | None) -> None:
    rng = np.random.default_rng(4)
    shape = (60, 90) if channels is None else (60, 90, channels)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    # transformers rejects 2-D arrays; compare those with the equivalent mode-"L" PIL image.
    ref_pixels, ref_grid = _reference(Image.fromarray(array) if channels is None else array)
    pixels, grid = preprocess_image(array)
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_allclose(pixels, ref_pixels, rtol=0, atol=1e-5)


def test_patch_layout_is_merge_aware() -> None:
    # Derived by hand: patch k of the output is the (row, col) patch of the merge-block order.
    array = _random_rgb(56, 84, seed=7)
    pixels, grid = preprocess_image(array)
    _, gh, gw = grid[0]
    c, t, p, m = 3, 2, 14, 2
    resized = pixels.reshape(gh * gw, c, t, p, p)
    order = [
        (bh * m + i, bw * m + j)
        for bh in range(gh // m)
        for bw in range(gw // m)
        for i in range(m)
        for j in range(m)
    ]
    image = np.zeros((c, gh * p, gw * p), np.float32)
    for k, (r, col) in enumerate(order):
        np.testing.assert_array_equal(resized[k, :, 0], resized[k, :, 1])  # repeated frame
        image[:, r * p : (r + 1) * p, col * p : (col + 1) * p] = resized[k, :, 0]
    expected = (np.asarray(Image.fromarray(array)).transpose(2, 0, 1) / 255.0).astype(np.float32)
    mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(OPENAI_CLIP_STD, np.float32)[:, None, None]
    np.testing.assert_allclose(image, (expected - mean) / std, atol=1e-5)


def test_smart_resize_equals_transformers() -> None:
    sizes = [1, 2, 13, 27, 28, 29, 41, 56, 100, 333, 999, 1024, 1999, 4000]
    for factor, min_pixels, max_pixels in [(28, 56 * 56, 28 * 28 * 1280), (16, 16 * 16, 64 * 64)]:
        for h in sizes:
            for w in sizes:
                if max(h, w) / min(h, w) > 200:
                    continue
                expected = hf_pil.smart_resize(h, w, factor, min_pixels, max_pixels)
                assert smart_resize(h, w, factor, min_pixels, max_pixels) == expected, (h, w)


def test_smart_resize_errors_name_size_and_limit() -> None:
    with pytest.raises(ValueError) as transformers_error:
        hf_pil.smart_resize(10, 2500)
    assert "aspect ratio" in str(transformers_error.value)
    with pytest.raises(ValueError, match=r"10x2500.*250\.0.*200"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="height=0"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, min_pixels=100, max_pixels=50)


def test_preprocess_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((30, 30, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(30, 30, 2\)"):
        preprocess_image(np.zeros((30, 30, 2), np.uint8))
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(np.zeros((1, 300, 3), np.uint8))


def test_module_imports_no_torch() -> None:
    forbidden = ("torch", "transformers", "diffusers")
    module = "runtime.host.image_preprocess"
    code = f"import sys, {module}; sys.exit(any(m in sys.modules for m in {forbidden}))"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )
