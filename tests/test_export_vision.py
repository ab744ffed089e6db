"""The `vision` graph: host feeds (runtime.host.vision_feeds), the export wrapper against
transformers'
own tower forward, and the exported ONNX graph in ONNX Runtime at grids other than the traced one.

Tiny preset: patch 4, merge 2, window 32 px (4 x 4 merged tokens), profile 64..1024 patches.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.dims import graph_dims
from export.onnx_export import (
    cast_feeds,
    expected_output_shapes,
    export_graph,
    ort_session,
    run_ort,
    torch_feeds,
    trace_sizes,
)
from export.wrappers.vision import VisionGraph
from runtime.folder.graphs import graph_specs
from runtime.folder.spec import check_feeds
from runtime.host.image_preprocess import preprocess_image
from runtime.host.vision_feeds import vision_feeds
from runtime.host.vision_grid import block_diagonal_mask, cu_seqlens, window_index

pytestmark = pytest.mark.slow  # exports graphs

IMAGES = {"64x64": [(64, 64)], "48x80": [(48, 80)], "128x96": [(128, 96)]}
IMAGES["two_images"] = IMAGES["48x80"] + IMAGES["128x96"]  # 240 + 768 patches of 4 px
# random pixels: 96 patches in 2 frames; 64 patches = the profile minimum (32x32 px at patch 4)
FRAMES = {"two_frames": [[2, 8, 6]], "min_profile": [[1, 8, 8]]}
CASES = sorted(IMAGES) + sorted(FRAMES)
ONNX_CASES = [c for c in CASES if c != "64x64"]  # 64x64 = 256 patches is the traced size
# ONNX Runtime vs transformers (fp32 reference; outputs are ~0.2 in magnitude).
ATOL = {"fp32": 1e-5, "fp16": 1e-3}


@pytest.fixture(scope="module")
def tiny(tiny_config):
    from training.model.blip3o import BLIP3o

    torch.manual_seed(0)
    visual = BLIP3o(tiny_config).eval().qwen.model.visual
    return visual, graph_specs(graph_dims(tiny_config))["vision"]


@pytest.fixture(scope="module")
def onnx_graphs(tiny, tmp_path_factory) -> dict[str, Path]:
    """The vision graph exported once per precision (from copies: export casts the module)."""
    visual, spec = tiny
    folder = tmp_path_factory.mktemp("vision")
    return {
        p: export_graph(
            VisionGraph(copy.deepcopy(visual)), spec, folder / f"vision-{p}.onnx", precision=p
        )
        for p in ("fp32", "fp16")
    }


def _vc(tiny):
    c = tiny[0].config
    return {
        "spatial_merge_size": c.spatial_merge_size,
        "window_size": c.window_size,
        "patch_size": c.patch_size,
    }


def _inputs(tiny, case: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values (N, patch_dim) float32, grid_thw (images, 3)) of a named case."""
    c = tiny[0].config
    rng = np.random.default_rng(sum(map(ord, case)))
    if case in FRAMES:
        grid = np.array(FRAMES[case], np.int64)
        n = int(np.prod(grid, axis=1).sum())
        patch_dim = 3 * c.temporal_patch_size * c.patch_size**2
        return rng.standard_normal((n, patch_dim)).astype(np.float32), grid
    pixels, grids = [], []
    for h, w in IMAGES[case]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        px, grid = preprocess_image(
            image,
            patch_size=c.patch_size,
            merge_size=c.spatial_merge_size,
            min_pixels=32 * 32,
            max_pixels=128 * 128,
        )
        assert grid[0, 1:].tolist() == [h // c.patch_size, w // c.patch_size]  # no resize
        pixels.append(px)
        grids.append(grid)
    return np.concatenate(pixels), np.concatenate(grids)


def _reference(visual, pixel_values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """transformers' own tower forward, original patch order."""
    with torch.no_grad():
        out = visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
    return out.pooler_output.numpy()  # (M, out_hidden)


@pytest.mark.parametrize("case", CASES)
def test_wrapper_equals_transformers(tiny, case: str) -> None:
    visual, spec = tiny
    pixel_values, grid = _inputs(tiny, case)
    feeds = vision_feeds(pixel_values, grid, **_vc(tiny))
    with torch.no_grad():
        ours = VisionGraph(visual)(**torch_feeds(spec, feeds)).numpy()
    np.testing.assert_allclose(ours, _reference(visual, pixel_values, grid), rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", sorted(ATOL))
@pytest.mark.parametrize("case", ONNX_CASES)
def test_onnx_equals_transformers(tiny, onnx_graphs, precision: str, case: str) -> None:
    visual, spec = tiny
    pixel_values, grid = _inputs(tiny, case)
    feeds = cast_feeds(spec, vision_feeds(pixel_values, grid, **_vc(tiny)), precision)
    check_feeds(spec, feeds, precision)
    assert len(pixel_values) != trace_sizes(spec)["patches"]
    out = run_ort(ort_session(onnx_graphs[precision]), feeds)["image_embeds"]
    assert out.shape == expected_output_shapes(spec, feeds)["image_embeds"]
    ref = _reference(visual, pixel_values, grid)
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=0, atol=ATOL[precision])


def test_fp16_graph_keeps_rope_norm_softmax_in_fp32(onnx_graphs) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(onnx_graphs["fp16"]))
    g = model.graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    ops = {"Softmax", "ReduceMean", "Cos", "Sin"}  # attention, RMSNorm variance, rotary
    seen = [(n.op_type, dtypes[n.input[0]]) for n in g.node if n.op_type in ops]
    assert {op for op, _ in seen} == ops
    assert all(dtype == onnx.TensorProto.FLOAT for _, dtype in seen), seen
    assert dtypes["image_embeds"] == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("case", ["two_images", "two_frames", "128x96"])
def test_vision_feeds_metadata(tiny, case: str) -> None:
    pixel_values, grid = _inputs(tiny, case)
    vc = _vc(tiny)
    feeds = vision_feeds(pixel_values, grid, **vc)
    n, unit = len(pixel_values), vc["spatial_merge_size"] ** 2
    assert {k: (v.dtype, v.shape) for k, v in feeds.items()} == {
        "pixel_values": (np.float32, pixel_values.shape),
        "rotary_pos_ids": (np.int64, (n, 2)),
        "full_segments": (np.int64, (n,)),
        "window_segments": (np.int64, (n,)),
        "reverse_index": (np.int64, (n // unit,)),
    }
    # The window reorder is a permutation of whole merge groups, and reverse_index inverts it.
    index, cu_window = window_index(grid, **vc)
    np.testing.assert_array_equal(np.sort(index), np.arange(n // unit))
    groups = feeds["pixel_values"].reshape(n // unit, -1)  # (M, unit * patch_dim)
    np.testing.assert_array_equal(
        groups[feeds["reverse_index"]], pixel_values.reshape(n // unit, -1)
    )
    np.testing.assert_array_equal(index[feeds["reverse_index"]], np.arange(n // unit))
    # Segments: non-decreasing from 0, one step per cu boundary, same masks as the cu arrays.
    for seg, cu in (
        (feeds["full_segments"], cu_seqlens(grid)),
        (feeds["window_segments"], cu_window),
    ):
        assert seg[0] == 0 and np.all(np.diff(seg) >= 0)
        np.testing.assert_array_equal(np.flatnonzero(np.diff(seg)) + 1, cu[1:-1])
        np.testing.assert_array_equal(seg[:, None] == seg[None, :], block_diagonal_mask(cu, n))
    assert feeds["full_segments"][-1] == grid[:, 0].sum() - 1  # one segment per frame


def test_vision_feeds_rejects_mismatched_pixels(tiny) -> None:
    pixel_values, grid = _inputs(tiny, "48x80")
    with pytest.raises(ValueError, match=r"\(240, \.\.\.\)"):  # 12 x 20 patches of 4 px
        vision_feeds(pixel_values[:-4], grid, **_vc(tiny))


def test_vision_feeds_imports_no_torch() -> None:
    forbidden = ("torch", "transformers", "diffusers")
    code = (
        "import sys, runtime.host.vision_feeds; "
        f"sys.exit(any(m in sys.modules for m in {forbidden}))"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )
