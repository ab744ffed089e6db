"""runtime.host.vision_grid against transformers' Qwen2.5-VL vision tower (tiny random weights)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import vision_utils
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)

from runtime.host.vision_grid import block_diagonal_mask, cu_seqlens, rotary_pos_ids, window_index

MERGE, PATCH, WINDOW = 2, 14, 112  # Qwen2.5-VL: 4 x 4 merged tokens per window

GRIDS = {
    "square_window_multiple": [[1, 16, 16]],  # 8x8 merged: whole windows (+ empty padded ones)
    "not_window_multiple": [[1, 10, 14]],  # 5x7 merged: partial windows
    "smaller_than_window": [[1, 2, 2]],
    "two_frames": [[2, 6, 10]],
    "three_images": [[1, 4, 6], [1, 16, 8], [1, 2, 2]],
    "large": [[1, 34, 50]],
}


@pytest.fixture(scope="module")
def tower() -> Qwen2_5_VisionTransformerPretrainedModel:
    config = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=16,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        window_size=WINDOW,
        fullatt_block_indexes=[1],
    )
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel(config).eval()


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_metadata_equals_transformers(name: str) -> None:
    grid = np.array(GRIDS[name], np.int64)
    grid_t = torch.from_numpy(grid)

    ref_pos = vision_utils.get_vision_position_ids(grid_t, MERGE).numpy()
    pos = rotary_pos_ids(grid, spatial_merge_size=MERGE)
    assert pos.dtype == np.int64
    np.testing.assert_array_equal(pos, ref_pos)

    ref_cu = vision_utils.get_vision_cu_seqlens(grid_t).numpy()
    cu = cu_seqlens(grid)
    assert cu.dtype == np.int32 == ref_cu.dtype
    np.testing.assert_array_equal(cu, ref_cu)

    ref_index, ref_cu_window = vision_utils.get_vision_window_index(grid_t, MERGE, WINDOW, PATCH)
    index, cu_window = window_index(
        grid, spatial_merge_size=MERGE, window_size=WINDOW, patch_size=PATCH
    )
    assert index.dtype == np.int64 and cu_window.dtype == np.int32
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(cu_window, ref_cu_window.numpy())


def test_window_index_by_hand() -> None:
    # 5 x 7 merged tokens, windows of 4: window sizes 4x4, 4x3, 1x4, 1x3 (in merged tokens).
    index, cu_window = window_index(np.array([[1, 10, 14]]))
    merged = np.arange(35).reshape(5, 7)
    expected = np.concatenate(
        [
            merged[:4, :4].ravel(),
            merged[:4, 4:].ravel(),
            merged[4:, :4].ravel(),
            merged[4:, 4:].ravel(),
        ]
    )
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_array_equal(cu_window, np.cumsum([0, 16, 12, 4, 3]) * 4)


@pytest.mark.parametrize("name", ["not_window_multiple", "three_images", "two_frames"])
def test_tower_forward_with_host_metadata(tower, name: str) -> None:
    # The tower pops precomputed metadata from its kwargs: ours must give the same output.
    grid = np.array(GRIDS[name], np.int64)
    n = int(np.prod(grid, axis=1).sum())
    torch.manual_seed(1)
    pixels = torch.randn(n, 3 * 2 * PATCH * PATCH)
    index, cu_window = window_index(grid)
    with torch.no_grad():
        ref = tower(pixels, grid_thw=torch.from_numpy(grid)).pooler_output
        ours = tower(
            pixels,
            grid_thw=torch.from_numpy(grid),
            position_ids=torch.from_numpy(rotary_pos_ids(grid)),
            cu_seqlens=torch.from_numpy(cu_seqlens(grid)),
            window_index=torch.from_numpy(index),
            cu_window_seqlens=torch.from_numpy(cu_window),
        ).pooler_output
        shuffled = tower(
            pixels,
            grid_thw=torch.from_numpy(grid),
            window_index=torch.from_numpy(index[::-1].copy()),
            cu_window_seqlens=torch.from_numpy(cu_window),
        ).pooler_output
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not torch.allclose(shuffled, ref, atol=1e-5)  # the comparison can fail


def _masked_attention(attn, x, cos, sin, mask: np.ndarray) -> torch.Tensor:
    """The tower's attention with one boolean mask instead of a cu_seqlens split."""
    n = x.shape[0]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, n, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(mask))
    return attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))


@pytest.mark.parametrize("name", ["three_images", "not_window_multiple", "square_window_multiple"])
def test_block_diagonal_mask_reproduces_split_attention(tower, name: str) -> None:
    grid = np.array(GRIDS[name], np.int64)
    n = int(np.prod(grid, axis=1).sum())
    attn = tower.blocks[0].attn
    torch.manual_seed(2)
    x = torch.randn(n, 32)
    cos, sin = tower.rotary_pos_emb(x, torch.from_numpy(rotary_pos_ids(grid)))
    _, cu_window = window_index(grid)
    for cu in (cu_seqlens(grid), cu_window):
        with torch.no_grad():
            ref = attn(x, cu_seqlens=torch.from_numpy(cu), position_embeddings=(cos, sin))
            ours = _masked_attention(attn, x, cos, sin, block_diagonal_mask(cu, n))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_block_diagonal_mask_by_hand() -> None:
    mask = block_diagonal_mask(np.array([0, 2, 2, 5], np.int32), 5)  # an empty segment too
    expected = np.zeros((5, 5), bool)
    expected[:2, :2] = True
    expected[2:, 2:] = True
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: block_diagonal_mask(np.array([0, 3]), 5), "n=5"),
        (lambda: block_diagonal_mask(np.array([1, 5]), 5), "from 0"),
        (lambda: block_diagonal_mask(np.array([0, 4, 3, 5]), 5), "non-decreasing"),
        (lambda: rotary_pos_ids(np.array([[1, 3, 4]])), "multiples of spatial_merge_size=2"),
        (lambda: window_index(np.array([[1, 4, 4]]), window_size=14), "window_size=14"),
        (lambda: cu_seqlens(np.array([1, 4, 4])), r"\(num_images, 3\)"),
    ],
)
def test_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_module_imports_no_torch() -> None:
    forbidden = ("torch", "transformers", "diffusers")
    code = (
        "import sys, runtime.host.vision_grid; "
        f"sys.exit(any(m in sys.modules for m in {forbidden}))"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )
