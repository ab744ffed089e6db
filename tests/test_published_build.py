"""Published-form checkpoints build and draw end to end: tiny through the runtime, and 4b's real
widths at reduced depth through `dit_step` and `prefill` against PyTorch.

The 4b checkpoint is `reduced_depth("4b", 1)`: Qwen2.5-VL-3B's widths, heads, FFN and 151,668-
token vocabulary with one text layer and one vision block, the 1792-wide DiT with one layer and
the SDXL-layout UNet at one resnet and transformer layer per block, written in bf16 exactly as
the release writes it (1.9 GB) and built with `--layers 1`: 72 s, peak RSS 6.7 GB (the
prefill export, measured by sampling).
Tolerances: fp32 ORT vs PyTorch, atol 1e-4 x the output's scale (measured max abs errors:
dit_step 1.0e-5 at scale 6.9, prefill 2.7e-6 at scale 4.4).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from export.build_plan import BuildRequest, build
from export.dims import graph_dims
from export.onnx_export import call_graph, ort_session, run_ort, torch_feeds
from export.wrappers import graph_module
from runtime.folder.graphs import RUNTIME_GRAPHS, graph_specs
from runtime.folder.manifest import load_manifest
from runtime.folder.spec import sample_inputs
from training.checkpoint import load_model, load_pipeline
from training.config import reduced_depth
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.published import qwen_shaped_tokenizer, write_published

FAST = dict(steps=4, decoder_steps=5)


@pytest.mark.slow
def test_tiny_published_checkpoint_builds_and_draws(tmp_path, tiny_config, tiny_tokenizer):
    from runtime.generator import Generator

    torch.manual_seed(7)
    model, decoder = BLIP3o(tiny_config).eval(), Decoder(tiny_config.decoder).eval()
    ckpt = write_published(
        model, decoder, tiny_tokenizer, tmp_path / "ckpt", max_shard_bytes=1 << 21
    )
    out = build(BuildRequest(variant="tiny", checkpoint=ckpt, out=tmp_path / "e", progress=False))
    manifest = load_manifest(out)
    assert set(manifest["graphs"]) == set(RUNTIME_GRAPHS) and manifest["checkpoint"]["path"]
    reference = load_pipeline(ckpt)
    with Generator.from_dir(out) as gen:
        for prompt, seed in [("a red circle", 0), ("two blue squares", 3)]:
            ours = np.asarray(gen.generate(prompt, seed=seed, **FAST)[0]).astype(int)
            ref = np.asarray(reference.generate(prompt, seed=seed, **FAST)).astype(int)
            assert np.abs(ours - ref).max() <= 2  # as the runtime's own parity test
        image = np.full((64, 64, 3), 255, np.uint8)
        ours = gen.answer(image, "Describe the image.", max_new_tokens=4)
    assert ours == reference.answer(image, "Describe the image.", max_new_tokens=4)


@pytest.fixture(scope="module")
def real_widths(tmp_path_factory, tiny_tokenizer):
    """A 4b checkpoint at 1 layer in the published form, and its folder built with --layers 1."""
    cfg = reduced_depth("4b", 1)
    torch.manual_seed(0)
    model, decoder = BLIP3o(cfg).eval(), Decoder(cfg.decoder).eval()
    for layer in model.dit.layers:  # the zero-initialized gates would hide cross-attention
        torch.nn.init.normal_(layer.gate, std=0.5)
    tmp = tmp_path_factory.mktemp("real_widths")
    tokenizer = qwen_shaped_tokenizer(tiny_tokenizer)  # Qwen's ids; the graphs never see them
    ckpt = write_published(model, decoder, tokenizer, tmp / "ckpt")
    del model, decoder
    gc.collect()
    request = BuildRequest(variant="4b", checkpoint=ckpt, layers=1, out=tmp / "e",
                           graphs=("prefill", "dit_step"), progress=False)  # fmt: skip
    return cfg, ckpt, build(request)


def _compare(cfg, ckpt, folder, graph, parts, sizes):
    spec = graph_specs(graph_dims(cfg))[graph]
    feeds = sample_inputs(spec, sizes, seed=1)
    got = run_ort(ort_session(folder / f"{graph}.fp32.onnx"), feeds)
    model = load_model(ckpt, config=cfg, parts=parts)
    with torch.no_grad():
        module = graph_module(graph, type("Parts", (), {"model": model, "decoder": None}))
        ref = call_graph(module, spec, torch_feeds(spec, feeds))
    errors = {}
    for name, want in zip(spec.output_names, ref):
        want = want.numpy()
        errors[name] = float(np.abs(got[name] - want).max())
        assert errors[name] <= 1e-4 * max(1.0, float(np.abs(want).max())), (name, errors)
    return errors


@pytest.mark.slow
def test_real_widths_dit_step_matches_pytorch(real_widths):
    cfg, ckpt, folder = real_widths
    assert load_manifest(folder)["config"]["backbone"]["hidden_size"] == 2048
    assert folder.name == "e"
    errors = _compare(cfg, ckpt, folder, "dit_step", ("dit.",), {"batch": 1})
    print("dit_step max abs error", errors)


@pytest.mark.slow
def test_real_widths_prefill_matches_pytorch(real_widths):
    cfg, ckpt, folder = real_widths
    parts = ("qwen.model.language_model.layers.", "qwen.model.language_model.norm.",
             "qwen.lm_head.")  # fmt: skip
    errors = _compare(cfg, ckpt, folder, "prefill", parts, {"text_batch": 1, "seq": 7})
    print("prefill max abs error", errors)
    assert (folder / "embeddings.npy").stat().st_size > 151668 * 2048 * 4  # the real vocabulary
