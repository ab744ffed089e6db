"""Host-side feeds of the ``vision`` graph: patches in window order plus their segment ids.

The Qwen2.5-VL tower permutes its patches into window order, attends per image/frame in its
full-attention blocks and per window elsewhere, and permutes the merged tokens back at the end.
All of that is data-dependent (``.tolist()`` splits, variable window counts), so the host does
it here with :mod:`runtime.host.vision_grid` and the graph only sees fixed-rank tensors:

- ``pixel_values`` and ``rotary_pos_ids`` already in window order. The patch embedding is a
  Conv3d with stride = kernel, i.e. per patch, so reordering its input equals reordering its
  output, which is what the tower does (groups of ``merge**2`` patches moved by
  ``window_index``).
- ``full_segments`` / ``window_segments``: per patch (window order) the 0-based id of its
  image/frame and of its window; the graph builds the block-diagonal masks as
  ``seg[:, None] == seg[None, :]``, with no ``(N, N)`` tensor crossing the host boundary.
- ``reverse_index = argsort(window_index)``: gathers the merged tokens back to image order.

numpy only: the runtime never imports torch or transformers.
"""

from __future__ import annotations

import numpy as np

from runtime.host.vision_grid import cu_seqlens, rotary_pos_ids, window_index


def segment_ids(cu: np.ndarray, n: int) -> np.ndarray:
    """0-based segment id of each of ``n`` tokens packed by cumulative lengths ``cu``.

    Token ``i`` gets ``(number of boundaries <= i) - 1``; empty segments take no id of their own.

    Returns:
        int64 ``(n,)``, non-decreasing.
    """
    cu = np.asarray(cu, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != n or np.any(np.diff(cu) < 0):
        raise ValueError(f"cu must be non-decreasing from 0 to n={n}, got {cu.tolist()}")
    return np.searchsorted(cu, np.arange(n), side="right").astype(np.int64) - 1  # (n,)


def window_patch_order(index: np.ndarray, merge_unit: int) -> np.ndarray:
    """Patch permutation of a merged-token ``window_index``: each merged token's
    ``merge_unit`` consecutive patches move together.

    Returns:
        int64 ``(len(index) * merge_unit,)``; window-ordered patch ``k`` is original patch
        ``order[k]``.
    """
    index = np.asarray(index, dtype=np.int64)
    return (index[:, None] * merge_unit + np.arange(merge_unit)).reshape(-1)  # (N,)


def vision_feeds(
    pixel_values: np.ndarray,
    grid_thw: np.ndarray,
    *,
    spatial_merge_size: int,
    window_size: int,
    patch_size: int,
) -> dict[str, np.ndarray]:
    """The five inputs of the ``vision`` graph for a batch of preprocessed images.

    Args:
        pixel_values: ``(N, patch_dim)`` flattened patches in the tower's order, as from
            :func:`runtime.host.image_preprocess.preprocess_image` (several images concatenated).
        grid_thw: ``(num_images, 3)`` patch grids of those images, ``N = sum(t * h * w)``.
        spatial_merge_size, window_size, patch_size: the tower's config values.

    Returns:
        ``pixel_values`` ``(N, patch_dim)`` (input dtype kept), ``rotary_pos_ids`` int64
        ``(N, 2)``, ``full_segments`` int64 ``(N,)``, ``window_segments`` int64 ``(N,)`` — all in
        window order — and ``reverse_index`` int64 ``(N / merge**2,)``. The graph's output
        ``image_embeds`` ``(N / merge**2, hidden)`` is in the images' own (raster) token order.
    """
    grid = np.asarray(grid_thw, dtype=np.int64)
    pixel_values = np.asarray(pixel_values)
    n = int(np.prod(grid, axis=-1).sum()) if grid.ndim == 2 else -1
    if pixel_values.ndim != 2 or pixel_values.shape[0] != n:
        raise ValueError(
            f"pixel_values must be (sum(t*h*w), patch_dim) = ({n}, ...) for grid_thw "
            f"{grid.tolist()}, got shape {pixel_values.shape}"
        )
    index, cu_window = window_index(
        grid, spatial_merge_size=spatial_merge_size, window_size=window_size, patch_size=patch_size
    )  # (N / m**2,), (windows + 1,)
    order = window_patch_order(index, spatial_merge_size**2)  # (N,)
    return {
        "pixel_values": pixel_values[order],  # (N, patch_dim)
        "rotary_pos_ids": rotary_pos_ids(grid, spatial_merge_size=spatial_merge_size)[order],
        "full_segments": segment_ids(cu_seqlens(grid), n),  # (N,)
        "window_segments": segment_ids(cu_window, n),  # (N,)
        "reverse_index": np.argsort(index, kind="stable").astype(np.int64),  # (N / m**2,)
    }
