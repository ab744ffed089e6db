"""runtime.host.mrope against transformers' Qwen2_5_VLModel.get_rope_index (tiny random model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from runtime.host.mrope import decode_position_ids, rope_index

IMAGE, VIDEO, START, END, PAD = 90, 91, 92, 93, 0
MERGE = 2


@pytest.fixture(scope="module")
def hf_model() -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1e6),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=16,
            spatial_merge_size=MERGE,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[0],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _image(grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [START] + [IMAGE] * (t * h * w // MERGE**2) + [END]


def _batch(rows: list[list[int]], left_pad: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pads rows to one length (left or right) and returns (input_ids, attention_mask)."""
    seq = max(len(r) for r in rows)
    ids = np.full((len(rows), seq), PAD, np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for b, row in enumerate(rows):
        sl = slice(seq - len(row), seq) if left_pad else slice(0, len(row))
        ids[b, sl], mask[b, sl] = row, 1
    return ids, mask


def _reference(model, ids: np.ndarray, grids: np.ndarray | None, mask: np.ndarray | None):
    input_ids = torch.from_numpy(ids)
    with torch.no_grad():
        pos, deltas = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=(input_ids == IMAGE).int(),
            image_grid_thw=None if grids is None else torch.from_numpy(grids),
            attention_mask=None if mask is None else torch.from_numpy(mask),
        )
    return pos.numpy(), deltas.numpy()


def _ours(ids, grids, mask):
    return rope_index(
        ids,
        grids,
        image_token_id=IMAGE,
        vision_start_token_id=START,
        spatial_merge_size=MERGE,
        attention_mask=mask,
    )


TEXT = [5, 6, 7, 8, 9]
CASES = {
    "text_only": ([TEXT + [10, 11], TEXT], []),
    "one_image": (
        [TEXT + _image((1, 4, 6)) + TEXT, TEXT[:2] + _image((1, 2, 2)) + [3]],
        [(1, 4, 6), (1, 2, 2)],
    ),
    "two_images": (
        [TEXT + _image((1, 6, 4)) + [12] + _image((1, 2, 8)) + TEXT, TEXT + _image((1, 4, 4))],
        [(1, 6, 4), (1, 2, 8), (1, 4, 4)],
    ),
    "image_first_and_last": (
        [_image((1, 4, 2)) + TEXT + _image((1, 2, 2))],
        [(1, 4, 2), (1, 2, 2)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_rope_index_equals_transformers(hf_model, case: str, padding: str) -> None:
    rows, grid_list = CASES[case]
    grids = np.array(grid_list, np.int64).reshape(-1, 3) if grid_list else None
    if padding == "none":
        rows = rows[:1]
        grids = None if grids is None else grids[: sum(r.count(START) for r in rows)]
        ids, mask = np.array(rows, np.int64), None
    else:
        ids, mask = _batch(rows, left_pad=padding == "left")
    ref_pos, ref_deltas = _reference(hf_model, ids, grids, mask)
    pos, deltas = _ours(ids, grids, mask)
    assert pos.dtype == np.int64 and pos.shape == (3, *ids.shape)
    assert deltas.dtype == np.int64 and deltas.shape == (ids.shape[0], 1)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas.reshape(-1, 1))


def test_text_only_is_plain_1d() -> None:
    # BLIP3-o generation: plain positions replicated on the three axes, zero deltas.
    ids, mask = _batch([TEXT, TEXT[:3]], left_pad=True)
    pos, deltas = _ours(ids, None, mask)
    np.testing.assert_array_equal(pos[0], pos[1])
    np.testing.assert_array_equal(pos[0], pos[2])
    np.testing.assert_array_equal(pos[0, 0], np.arange(5))
    np.testing.assert_array_equal(pos[0, 1], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(deltas, [[0], [0]])


def test_image_positions_by_hand() -> None:
    ids = np.array([[1, 2] + _image((1, 4, 6)) + [3]])  # merged grid 2 x 3
    pos, deltas = _ours(ids, np.array([[1, 4, 6]]), None)
    # text 0, 1; vision_start 2; image at 3 + (0, row, col); end token at 3 + max(2, 3) = 6.
    np.testing.assert_array_equal(pos[:, 0, :3], [[0, 1, 2]] * 3)
    np.testing.assert_array_equal(pos[0, 0, 3:9], [3] * 6)
    np.testing.assert_array_equal(pos[1, 0, 3:9], [3, 3, 3, 4, 4, 4])
    np.testing.assert_array_equal(pos[2, 0, 3:9], [3, 4, 5, 3, 4, 5])
    np.testing.assert_array_equal(pos[:, 0, 9:], [[6, 7]] * 3)
    assert deltas[0, 0] == 8 - 11


class _Cache:
    def __init__(self, length: int) -> None:
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def test_decode_positions_equal_transformers(hf_model) -> None:
    rows, grid_list = CASES["two_images"]
    ids = np.array([rows[0], rows[0]], np.int64)
    grids = np.array(grid_list[:2] * 2, np.int64)
    _, deltas = _ours(ids, grids, None)
    model = hf_model.model
    model.rope_deltas = torch.from_numpy(deltas)
    for past in (ids.shape[1], ids.shape[1] + 7):
        ref = model.compute_3d_position_ids(
            input_ids=None,
            image_grid_thw=None,
            video_grid_thw=None,
            inputs_embeds=torch.zeros(2, 1, 16),
            attention_mask=None,
            cache=_Cache(past),
        )
        np.testing.assert_array_equal(decode_position_ids(past, deltas, 2), ref.numpy())
    # One prompt, two samples: deltas repeat over the batch.
    model.rope_deltas = torch.from_numpy(deltas[:1])
    ref = model.compute_3d_position_ids(None, None, None, torch.zeros(4, 1, 16), None, _Cache(50))
    np.testing.assert_array_equal(decode_position_ids(50, deltas[:1], 4), ref.numpy())
    model.rope_deltas = None


def test_decode_positions_with_left_padding_equal_generation(hf_model) -> None:
    rows, grid_list = CASES["two_images"]
    ids, mask = _batch(rows, left_pad=True)
    _, deltas = _ours(ids, np.array(grid_list, np.int64), mask)
    hf_model.model.rope_deltas = torch.from_numpy(deltas)
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)  # prompt + new token
    ref = hf_model._prepare_position_ids_for_generation(
        torch.from_numpy(ids),
        {
            "attention_mask": torch.from_numpy(step_mask),
            "cache": _Cache(ids.shape[1]),
            "input_ids": torch.full((2, 1), 7),
        },
    )
    hf_model.model.rope_deltas = None
    got = decode_position_ids(mask.sum(axis=1), deltas, 2)  # real tokens only
    np.testing.assert_array_equal(got[0], ref[0, :, -1:].numpy())


@pytest.mark.parametrize(
    ("rows", "grids", "match"),
    [
        ([TEXT + _image((1, 4, 4))], [], "more images"),
        ([TEXT + _image((1, 4, 4))], [(1, 4, 8)], "consecutive image tokens"),
        ([TEXT], [(1, 2, 2)], "1 rows but the prompts hold 0"),
        ([TEXT + [IMAGE, IMAGE]], [], "follow the last image"),
    ],
)
def test_rope_index_errors(rows, grids, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _ours(np.array(rows), np.array(grids, np.int64).reshape(-1, 3), None)


def test_decode_position_ids_errors() -> None:
    with pytest.raises(ValueError, match="multiple"):
        decode_position_ids(3, np.zeros((2, 1), np.int64), 3)
    with pytest.raises(ValueError, match=r"\(B, 1\)"):
        decode_position_ids(3, np.zeros(2, np.int64), 2)


def test_module_imports_no_torch() -> None:
    forbidden = ("torch", "transformers", "diffusers")
    code = f"import sys, runtime.host.mrope; sys.exit(any(m in sys.modules for m in {forbidden}))"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )
