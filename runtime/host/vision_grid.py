"""Grid metadata of the Qwen2.5-VL vision tower, computed on the host from ``grid_thw``.

The tower derives from the patch grid of each image: 2-D rotary position ids, a window
permutation of the merged tokens, and cumulative sequence lengths that split attention per image
(full-attention blocks) or per window (windowed blocks). It computes them with data-dependent
shapes and ``.tolist()`` loops, which an ONNX/TensorRT graph cannot, so the exported ``vision``
graph takes them as inputs, with the ``cu_seqlens`` splits replaced by boolean block-diagonal
attention masks: :func:`block_diagonal_mask` of :func:`cu_seqlens` for the full blocks, and of the
``cu_window_seqlens`` from :func:`window_index` for the windowed blocks (that mask applies to the
window-reordered sequence, which is the order the tower works in).

Semantics follow transformers 5.x ``transformers.vision_utils`` (``get_vision_position_ids``,
``get_vision_window_index``, ``get_vision_cu_seqlens``) as used by
``Qwen2_5_VisionTransformerPretrainedModel.forward``; the tests compare against them.
"""

from __future__ import annotations

import numpy as np


def _grids(grid_thw: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must be (num_images, 3) with >= 1 row, got shape {grid.shape}")
    if np.any(grid < 1):
        raise ValueError(f"grid_thw entries must be >= 1, got {grid.tolist()}")
    return grid


def _check_merge(grid: np.ndarray, merge: int) -> None:
    if merge < 1 or np.any(grid[:, 1:] % merge):
        raise ValueError(
            f"grid heights and widths must be multiples of spatial_merge_size={merge}, "
            f"got {grid.tolist()}"
        )


def rotary_pos_ids(grid_thw: np.ndarray, *, spatial_merge_size: int = 2) -> np.ndarray:
    """(row, col) patch coordinates that the tower's 2-D rotary embedding rotates by.

    Patches are listed in the order of ``pixel_values``: per image, per frame, ``merge x merge``
    blocks in raster order and raster order inside each block.

    Returns:
        int64 ``(N, 2)`` with ``N = sum(t * h * w)``; column 0 is the row, column 1 the column.
    """
    grid = _grids(grid_thw)
    _check_merge(grid, spatial_merge_size)
    m = spatial_merge_size
    out = []
    for t, h, w in grid.tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w)
        hh = hh.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()  # (h*w,)
        ww = ww.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()  # (h*w,)
        out.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))  # (t*h*w, 2)
    return np.concatenate(out).astype(np.int64)  # (N, 2)


def cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """Cumulative lengths of the full-attention segments: one per frame (``h * w`` patches).

    Returns:
        int32 ``(num_frames + 1,)`` starting at 0 and ending at ``N``.
    """
    grid = _grids(grid_thw)
    lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])  # (num_frames,)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # (num_frames + 1,)


def window_index(
    grid_thw: np.ndarray,
    *,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
) -> tuple[np.ndarray, np.ndarray]:
    """Window permutation of the merged tokens and the windows' cumulative lengths.

    The merged grid (``h/m x w/m`` per frame) is cut into windows of ``window_size // m //
    patch_size`` merged tokens per side (4 for Qwen2.5-VL: 112 px), the last row/column of windows
    possibly smaller. ``window_index[k]`` is the merged token placed at position ``k`` of the
    windowed order; the tower applies it to groups of ``m * m`` patches.

    Returns:
        window_index: int64 ``(N / m**2,)``.
        cu_window_seqlens: int32 cumulative window lengths in patches, from 0 to ``N``, with
        consecutive duplicates removed as transformers does (its padding can create empty windows).
    """
    grid = _grids(grid_thw)
    _check_merge(grid, spatial_merge_size)
    m = spatial_merge_size
    win = window_size // m // patch_size
    if win < 1:
        raise ValueError(
            f"window_size={window_size} must be >= spatial_merge_size * patch_size "
            f"= {m * patch_size}"
        )
    indices: list[np.ndarray] = []
    bounds: list[int] = [0]
    offset = 0
    for t, h, w in grid.tolist():
        gh, gw = h // m, w // m
        index = np.arange(t * gh * gw).reshape(t, gh, gw)  # (t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win  # a full extra window when divisible
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
        padded = padded.reshape(t, nh, win, nw, win).transpose(
            0, 1, 3, 2, 4
        )  # (t, nh, nw, win, win)
        padded = padded.reshape(t * nh * nw, win * win)  # (windows, win*win)
        seqlens = (padded >= 0).sum(axis=1)  # (windows,)
        indices.append(padded[padded >= 0] + offset)
        bounds.extend((np.cumsum(seqlens) * m * m + bounds[-1]).tolist())
        offset += t * gh * gw
    cu = np.asarray(bounds, dtype=np.int32)  # (windows + 1,)
    keep = np.concatenate([[True], cu[1:] != cu[:-1]])  # torch.unique_consecutive
    return np.concatenate(indices).astype(np.int64), cu[keep]


def block_diagonal_mask(cu_seqlens: np.ndarray, n: int) -> np.ndarray:
    """Attention mask of packed segments: ``True`` where query ``i`` may attend to key ``j``.

    Args:
        cu_seqlens: non-decreasing cumulative lengths from 0 to ``n`` (as from :func:`cu_seqlens`
            or :func:`window_index`).
        n: sequence length.

    Returns:
        bool ``(n, n)``, True inside the diagonal blocks ``[cu[k], cu[k+1])``.
    """
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != n or np.any(np.diff(cu) < 0):
        raise ValueError(
            f"cu_seqlens must be non-decreasing from 0 to n={n}, "
            f"got {np.asarray(cu_seqlens).tolist()}"
        )
    segment = np.searchsorted(cu, np.arange(n), side="right")  # (n,) segment id of each token
    return segment[:, None] == segment[None, :]  # (n, n)
