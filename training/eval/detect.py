"""Palette detector for shapes-world images (docs/shapes-world.md, mini-GenEval).

GenEval scores generations with an object detector; in the shapes world the detector is exact and
rule-based, so a score measures the generator alone:
- a pixel belongs to the nearest palette color within RGB distance 60, else to the background;
- objects are 4-connected components of one color with area >= 20 px;
- shape from the fill ratio area / (bbox w * h): >= 0.88 square, [0.62, 0.88) circle, < 0.62
  triangle.
Connected components are a plain flood fill (no scipy): 64x64 images make that cheap.
Coordinates: x = column, y = row (growing downward); bboxes are (x0, y0, x1, y1), x1/y1 exclusive;
centroids are (x, y) mean pixel indices, the convention of `ShapeObject.centroid`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data.shapes import COLORS, PALETTE

COLOR_TOLERANCE = 60.0
MIN_AREA = 20
SQUARE_MIN_FILL = 0.88
CIRCLE_MIN_FILL = 0.62
_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.int32)  # (6, 3)


@dataclass(frozen=True)
class Detection:
    """One detected object."""

    color: str
    shape: str
    area: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W) int array: index into COLORS of each pixel's palette color, -1 for background."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}"
        )
    diff = image[:, :, None, :].astype(np.int32) - _PALETTE_RGB  # (H, W, 6, 3)
    dist2 = (diff * diff).sum(axis=-1)  # (H, W, 6)
    nearest = dist2.argmin(axis=-1)  # (H, W)
    within = np.take_along_axis(dist2, nearest[..., None], axis=-1)[..., 0] <= COLOR_TOLERANCE**2
    return np.where(within, nearest, -1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a (H, W) bool mask, as arrays of flat pixel indices."""
    height, width = mask.shape
    inside = mask.ravel().tolist()
    seen = bytearray(height * width)
    found = []
    for start in np.flatnonzero(mask).tolist():
        if seen[start]:
            continue
        seen[start] = 1
        stack, pixels = [start], []
        while stack:
            i = stack.pop()
            pixels.append(i)
            col = i % width
            for j, ok in ((i - width, i >= width), (i + width, i < (height - 1) * width),
                          (i - 1, col > 0), (i + 1, col < width - 1)):  # fmt: skip
                if ok and inside[j] and not seen[j]:
                    seen[j] = 1
                    stack.append(j)
        found.append(np.array(pixels, dtype=np.int64))
    return found


def shape_from_fill(fill: float) -> str:
    """Shape name for a fill ratio area / (bbox w * h)."""
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


def detect(image: np.ndarray) -> list[Detection]:
    """Detect every object of an (H, W, 3) uint8 image, in palette order, then raster order."""
    labels = classify_pixels(image)  # (H, W)
    width = labels.shape[1]
    detections = []
    for index, color in enumerate(COLORS):
        for pixels in components(labels == index):
            if pixels.size < MIN_AREA:
                continue
            rows, cols = pixels // width, pixels % width
            x0, y0, x1, y1 = (
                int(cols.min()),
                int(rows.min()),
                int(cols.max()) + 1,
                int(rows.max()) + 1,
            )
            fill = pixels.size / ((x1 - x0) * (y1 - y0))
            detections.append(
                Detection(
                    color=color,
                    shape=shape_from_fill(fill),
                    area=int(pixels.size),
                    bbox=(x0, y0, x1, y1),
                    centroid=(float(cols.mean()), float(rows.mean())),
                )
            )
    return detections
