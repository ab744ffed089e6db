"""M-RoPE position ids for the Qwen2.5-VL text decoder (inputs of ``prefill`` and ``decode``).

Qwen2.5-VL rotates each query/key with three position ids (temporal, height, width). Text tokens
use the same id on all three axes, counting up by one. The ``t*h*w / merge^2`` tokens of an image
start at the running position ``p`` and take ids ``(p + frame, p + row, p + col)`` over the
merged grid; the text after it resumes at ``p + max(rows, cols)``. Padding (attention mask 0)
gets id 0 and does not advance the count. ``rope_deltas = max_id + 1 - n_tokens`` per row turns a
decode step's plain count into its M-RoPE id. For BLIP3-o generation (text only) all of this
reduces to ordinary 1-D positions replicated on the three axes.

Images only: video inputs (temporal spacing by ``tokens_per_second``) are not supported.
Semantics follow transformers 5.x ``Qwen2_5_VLModel.get_rope_index`` (padding gets 0, deltas
count non-padding tokens), which the tests compare against.
"""

from __future__ import annotations

import numpy as np


def _image_positions(start: int, grid_thw: np.ndarray, merge: int) -> np.ndarray:
    t, h, w = (int(v) for v in grid_thw)
    gh, gw = h // merge, w // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start  # (3, t*gh*gw)


def _row_positions(
    ids: np.ndarray,
    grids: np.ndarray,
    image_token_id: int,
    vision_start_token_id: int,
    merge: int,
) -> tuple[np.ndarray, int]:
    """Positions (3, n) of one unpadded row and the number of images it consumed."""
    starts = np.flatnonzero(ids[:-1] == vision_start_token_id)
    n_images = int(np.sum(ids[starts + 1] == image_token_id))
    if n_images > len(grids):
        raise ValueError(
            f"the prompt holds more images than image_grid_thw rows ({len(grids)} left)"
        )
    parts: list[np.ndarray] = []
    pos, st = 0, 0
    for i in range(n_images):
        ed = st + int(np.argmax(ids[st:] == image_token_id))
        t, h, w = (int(v) for v in grids[i])
        if h % merge or w % merge:
            raise ValueError(f"image grid {t}x{h}x{w} is not divisible by merge size {merge}")
        n = t * h * w // merge**2
        if ed + n > len(ids) or not np.all(ids[ed : ed + n] == image_token_id):
            raise ValueError(
                f"image {i} with grid {t}x{h}x{w} needs {n} consecutive image tokens from index "
                f"{ed}, the prompt has {int(np.sum(ids[ed : ed + n] == image_token_id))}"
            )
        parts.append(np.broadcast_to(np.arange(ed - st) + pos, (3, ed - st)))  # text before
        pos += ed - st
        parts.append(_image_positions(pos, grids[i], merge))
        pos += max(h, w) // merge
        st = ed + n
    if np.any(ids[st:] == image_token_id):
        raise ValueError(
            f"{int(np.sum(ids[st:] == image_token_id))} image tokens follow the last image; "
            "each image must start with the vision-start token"
        )
    parts.append(np.broadcast_to(np.arange(len(ids) - st) + pos, (3, len(ids) - st)))
    return np.concatenate(parts, axis=1).astype(np.int64), n_images  # (3, n)


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D position ids of a prefill.

    Args:
        input_ids: ``(B, S)`` token ids; each image is ``vision_start`` followed by its
            ``t*h*w / merge^2`` image tokens (the processor's expansion of ``<|image_pad|>``).
        image_grid_thw: ``(num_images, 3)`` patch grids of all images of the batch, in order
            (row 0's images first), or None for text only.
        attention_mask: ``(B, S)``, 1 for tokens, 0 for padding (left or right); None = all 1.

    Returns:
        position_ids: int64 ``(3, B, S)`` (padding positions hold 0).
        rope_deltas: int64 ``(B, 1)``: ``max position + 1 - number of tokens``, 0 for text only.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, S), got shape {input_ids.shape}")
    batch, seq = input_ids.shape
    if attention_mask is None:
        mask = np.ones((batch, seq), dtype=bool)  # (B, S)
    else:
        mask = np.asarray(attention_mask).astype(bool)  # (B, S)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {mask.shape} must match input_ids {input_ids.shape}")
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be (num_images, 3), got shape {grids.shape}")
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")

    position_ids = np.zeros((3, batch, seq), dtype=np.int64)  # (3, B, S)
    rope_deltas = np.zeros((batch, 1), dtype=np.int64)  # (B, 1)
    used = 0
    for b in range(batch):
        ids = input_ids[b][mask[b]]  # (n,)
        if ids.size == 0:
            continue
        pos, n_images = _row_positions(
            ids, grids[used:], image_token_id, vision_start_token_id, spatial_merge_size
        )
        used += n_images
        position_ids[:, b, mask[b]] = pos
        rope_deltas[b, 0] = pos.max() + 1 - ids.size
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the prompts hold {used} images")
    return position_ids, rope_deltas


def decode_position_ids(
    past_length: int | np.ndarray, rope_deltas: np.ndarray, batch: int
) -> np.ndarray:
    """Position ids ``(3, batch, 1)`` of the next decoded token: ``past_length + rope_deltas``.

    Args:
        past_length: number of non-padding tokens already in the cache, an int or ``(batch,)``
            per row (with left padding count only real tokens, as transformers' generation).
        rope_deltas: ``(B, 1)`` from :func:`rope_index`; ``B`` must divide ``batch`` (rows are
            repeated, e.g. for several samples per prompt).
    """
    rope_deltas = np.asarray(rope_deltas, dtype=np.int64)
    if rope_deltas.ndim != 2 or rope_deltas.shape[1] != 1:
        raise ValueError(f"rope_deltas must be (B, 1), got shape {rope_deltas.shape}")
    if batch < 1 or batch % rope_deltas.shape[0]:
        raise ValueError(
            f"batch {batch} must be a positive multiple of the rope_deltas batch "
            f"{rope_deltas.shape[0]}"
        )
    deltas = np.repeat(rope_deltas, batch // rope_deltas.shape[0], axis=0)  # (batch, 1)
    past = np.asarray(past_length, dtype=np.int64).reshape(-1, 1)  # (1|batch, 1)
    if past.shape[0] not in (1, batch):
        raise ValueError(f"past_length must be an int or ({batch},), got shape {past.shape[:1]}")
    pos = past + deltas  # (batch, 1)
    return np.broadcast_to(pos[None], (3, batch, 1)).copy()  # (3, batch, 1)
