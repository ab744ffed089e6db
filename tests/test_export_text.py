"""ONNX parity of the text-decoder graphs (`prefill`, `decode`) on a seeded random tiny model.

Each graph is exported once per module (traced at the spec's trace sizes) and run in ONNX Runtime
CPU at other sizes: sequence lengths 1 (the profile minimum), 5 and 103 (the tiny generation
prompt: 38 prompt tokens, `[IMG]` and 64 queries), text batch 1 and 2. The reference is
transformers' own text decoder (`qwen.model.language_model` + `lm_head`), not the wrappers.
Every run checks its feeds against the spec and its outputs against the shapes it promises.

Tolerances (fp32): 1e-4 absolute on hidden states, logits and K/V (measured ~1e-6).
fp16 prefill: cosine > 0.999 to the fp32 reference on hidden states and logits.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from export.dims import graph_dims
from export.onnx_export import (
    cast_feeds,
    expected_output_shapes,
    export_graph,
    ort_session,
    run_ort,
    trace_sizes,
)
from export.wrappers.text import DecodeGraph, PrefillGraph
from runtime.folder.graphs import cache_feeds, cache_names, graph_specs
from runtime.folder.spec import check_feeds
from runtime.host.mrope import rope_index
from training.config import from_preset
from training.model.blip3o import BLIP3o

pytestmark = pytest.mark.slow  # exports graphs

ATOL = 1e-4  # fp32 ORT vs PyTorch: hidden states, logits, K/V
FP16_COSINE = 0.999  # fp16 graph vs fp32 PyTorch


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Seeded tiny model, its text specs and ORT sessions of the exported fp32 graphs."""
    torch.manual_seed(0)
    model = BLIP3o(from_preset("tiny")).eval()
    specs = graph_specs(graph_dims(model.config))
    out = tmp_path_factory.mktemp("text_onnx")
    sessions = {}
    for name, wrapper in (("prefill", PrefillGraph), ("decode", DecodeGraph)):
        path = export_graph(wrapper(model.qwen), specs[name], out / f"{name}.onnx")
        sessions[name] = ort_session(path)
    return model, specs, sessions, out


def run(specs, sessions, name, feeds, precision="fp32"):
    """Run one graph after checking the feeds; check the output shapes against the spec."""
    spec = specs[name]
    check_feeds(spec, feeds, precision)
    outputs = run_ort(sessions[name], feeds)
    shapes = {k: v.shape for k, v in outputs.items()}
    assert shapes == expected_output_shapes(spec, feeds)
    return outputs


def embeds_of(model, batch: int, seq: int, seed: int) -> np.ndarray:
    """Token embeddings of random ids: (B, S, H) float32."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.backbone.vocab_size, (batch, seq), generator=g)
    with torch.no_grad():
        return model.qwen.model.language_model.embed_tokens(ids).numpy()  # (B, S, H)


def text_positions(batch: int, start: int, length: int) -> np.ndarray:
    """Plain positions start..start+length-1 on all 3 M-RoPE rows: (3, B, S) int64."""
    pos = np.arange(start, start + length, dtype=np.int64)
    return np.broadcast_to(pos, (3, batch, length)).copy()


def reference(model, embeds, positions, past=None):
    """transformers' text decoder on an optional (keys, values) past (L, B, KV, P, D):
    hidden (B, S, H), logits of every position (B, S, V), stacked K/V (L, B, KV, P+S, D)."""
    lm = model.qwen.model.language_model
    cache = DynamicCache(config=lm.config)
    for i, (k, v) in enumerate(zip(*past) if past is not None else ()):
        cache.update(torch.from_numpy(k), torch.from_numpy(v), i)  # (B, KV, P, D) each
    with torch.no_grad():
        out = lm(
            inputs_embeds=torch.from_numpy(embeds),
            position_ids=torch.from_numpy(positions),
            cache=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state  # (B, S, H)
        logits = model.qwen.lm_head(hidden)  # (B, S, V)
    keys = torch.stack([layer.keys for layer in cache.layers]).numpy()  # (L, B, KV, T, D)
    values = torch.stack([layer.values for layer in cache.layers]).numpy()  # (L, B, KV, T, D)
    return hidden.numpy(), logits.numpy(), keys, values


def max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_trace_sizes_differ_from_tested(text):
    _, specs, _, _ = text
    assert trace_sizes(specs["prefill"])["seq"] not in (5, 103)
    assert trace_sizes(specs["decode"])["text_batch"] == 2


@pytest.mark.parametrize("batch,seq", [(2, 1), (1, 5), (2, 5), (1, 103), (2, 103)])
def test_prefill_matches_pytorch(text, batch, seq):
    model, specs, sessions, _ = text
    embeds = embeds_of(model, batch, seq, seed=seq + batch)
    positions = text_positions(batch, 0, seq)
    got = run(specs, sessions, "prefill", {"inputs_embeds": embeds, "position_ids": positions})
    hidden, logits, keys, values = reference(model, embeds, positions)
    assert max_err(got["hidden_states"], hidden) < ATOL
    assert max_err(got["logits"], logits[:, -1]) < ATOL
    assert max_err(got["present_keys"], keys) < ATOL
    assert max_err(got["present_values"], values) < ATOL


def empty_cache(keys: np.ndarray, capacity: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (L, B, KV, capacity, D) key/value pair holding prefill's rows, the rest random noise
    (the graph must ignore rows at and past `cache_position`, whatever they hold)."""
    rng = np.random.default_rng(seed)
    shape = (*keys.shape[:3], capacity, keys.shape[4])
    return tuple(100 * rng.standard_normal(shape).astype(np.float32) for _ in range(2))


@pytest.mark.parametrize("batch,seq,capacity", [(1, 1, 4), (2, 5, 9), (1, 103, 300)])
def test_greedy_decode_matches_full_forward(text, batch, seq, capacity):
    """Prefill S tokens into a preallocated cache, decode 3 greedily writing each token's row in
    place at `cache_position`, compare to one S+3 forward (logits and the whole cache)."""
    model, specs, sessions, _ = text
    table = model.qwen.model.language_model.embed_tokens.weight.detach().numpy()  # (V, H)
    embeds = embeds_of(model, batch, seq, seed=7 * seq + batch)
    out = run(
        specs,
        sessions,
        "prefill",
        {"inputs_embeds": embeds, "position_ids": text_positions(batch, 0, seq)},
    )
    keys, values = empty_cache(out["present_keys"], capacity)  # (L, B, KV, C, D)
    keys[..., :seq, :], values[..., :seq, :] = out["present_keys"], out["present_values"]
    step_logits, tokens = [], [out["logits"].argmax(-1)]  # tokens: (B,) each
    for step in range(3):
        feeds = {
            "inputs_embeds": table[tokens[-1]][:, None],  # (B, 1, H)
            "position_ids": text_positions(batch, seq + step, 1),  # (3, B, 1)
            "cache_position": np.array([seq + step], np.int64),
            **cache_feeds(keys, values),
        }
        out = run(specs, sessions, "decode", feeds)
        assert out["new_keys"].shape == (*keys.shape[:3], 1, keys.shape[4])  # not the past's
        keys[..., seq + step, :] = out["new_keys"][..., 0, :]
        values[..., seq + step, :] = out["new_values"][..., 0, :]
        step_logits.append(out["logits"])  # (B, V)
        tokens.append(out["logits"].argmax(-1))
    fed = np.stack([table[t] for t in tokens[:3]], axis=1)  # (B, 3, H)
    full = np.concatenate([embeds, fed], axis=1)  # (B, S+3, H)
    _, logits, ref_keys, ref_values = reference(model, full, text_positions(batch, 0, seq + 3))
    for step, got in enumerate(step_logits):
        assert max_err(got, logits[:, seq + step]) < ATOL, f"decode step {step}"
    assert max_err(keys[..., : seq + 3, :], ref_keys) < ATOL
    assert max_err(values[..., : seq + 3, :], ref_values) < ATOL


def test_decode_reads_only_the_rows_before_cache_position(text):
    """Changing a cache row at or past `cache_position` leaves the logits alone; changing one
    before it does not (so the mask is neither missing nor off by one)."""
    model, specs, sessions, _ = text
    rng = np.random.default_rng(3)
    _, kv, _, d = specs["decode"].tensor("cache_keys.0").shape  # (B, KV, C, D) per layer
    keys = rng.standard_normal((model.config.backbone.num_layers, 1, kv, 12, d))
    keys = keys.astype(np.float32)  # (L, B, KV, C, D)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    feeds = {
        "inputs_embeds": embeds_of(model, 1, 1, seed=4),
        "position_ids": text_positions(1, 6, 1),
        "cache_position": np.array([6], np.int64),
        **cache_feeds(keys, values),
    }
    base = run(specs, sessions, "decode", feeds)["logits"]
    for row, changes in ((6, False), (11, False), (5, True)):
        k, v = keys.copy(), values.copy()
        k[..., row, :] += 3.0
        v[..., row, :] -= 3.0
        got = run(specs, sessions, "decode", {**feeds, **cache_feeds(k, v)})
        assert (max_err(got["logits"], base) > ATOL) == changes, f"row {row}"


def mrope_positions(cfg, batch: int, kind: str) -> np.ndarray:
    """(3, B, 14) int64 position ids whose 3 rows differ.

    rope_index: `runtime.host.mrope` ids of [text, vision_start, 6 image tokens (merged grid 2x3),
    vision_end, text]; spread: three unrelated rows spanning the position range.
    """
    b = cfg.backbone
    if kind == "spread":
        a = np.arange(14)
        rows = np.stack([a, 3 * a + 50, 600 - 7 * a])  # (3, 14)
        return np.broadcast_to(rows[:, None], (3, batch, 14)).copy()
    merge = b.vision.spatial_merge_size
    row = [10, 11, 12, b.vision_start_token_id] + [b.image_token_id] * 6
    row += [b.vision_end_token_id, 20, 21, 22]
    positions, _ = rope_index(
        np.array([row] * batch),  # (B, 14)
        np.array([[1, 2 * merge, 3 * merge]] * batch),  # (B images, 3)
        image_token_id=b.image_token_id,
        vision_start_token_id=b.vision_start_token_id,
        spatial_merge_size=merge,
    )
    return positions  # (3, B, 14)


def one_row(positions: np.ndarray, row: int) -> np.ndarray:
    """Row `row` of (3, B, S) ids copied onto all 3 axes: what a graph ignoring M-RoPE sees."""
    return np.ascontiguousarray(np.repeat(positions[row : row + 1], 3, axis=0))


@pytest.mark.parametrize("kind", ["rope_index", "spread"])
@pytest.mark.parametrize("batch", [1, 2])
def test_mrope_positions_honoured(text, batch, kind):
    """With 3 different position rows, prefill and decode match PyTorch; and a graph that read
    one row only would miss the tolerance (checked on the reference, so the test means it)."""
    model, specs, sessions, _ = text
    positions = mrope_positions(model.config, batch, kind)  # (3, B, S)
    embeds = embeds_of(model, batch, positions.shape[-1], seed=11)
    got = run(specs, sessions, "prefill", {"inputs_embeds": embeds, "position_ids": positions})
    hidden, logits, keys, values = reference(model, embeds, positions)
    assert max_err(got["hidden_states"], hidden) < ATOL
    assert max_err(got["logits"], logits[:, -1]) < ATOL
    assert max_err(got["present_keys"], keys) < ATOL
    for row in range(3):
        assert max_err(reference(model, embeds, one_row(positions, row))[0], hidden) > ATOL

    step = np.array([40, 33, 47], np.int64).reshape(3, 1, 1).repeat(batch, 1)  # (3, B, 1)
    token = embeds_of(model, batch, 1, seed=12)  # (B, 1, H)
    seq = positions.shape[-1]
    cache_keys, cache_values = empty_cache(got["present_keys"], seq + 5)
    cache_keys[..., :seq, :], cache_values[..., :seq, :] = keys, values
    feeds = {
        "inputs_embeds": token,
        "position_ids": step,
        "cache_position": np.array([seq], np.int64),
        **cache_feeds(cache_keys, cache_values),
    }
    out = run(specs, sessions, "decode", feeds)
    _, ref_logits, ref_keys, _ = reference(model, token, step, (keys, values))
    assert max_err(out["logits"], ref_logits[:, -1]) < ATOL
    assert max_err(out["new_keys"], ref_keys[..., seq:, :]) < ATOL
    for row in range(3):
        alt = reference(model, token, one_row(step, row), (keys, values))[1]
        assert max_err(alt[:, -1], ref_logits[:, -1]) > ATOL


def test_fp16_prefill_runs_in_ort_cpu(text):
    """fp16 prefill graph (fp16 I/O) on ORT CPU stays close to the fp32 PyTorch reference."""
    model, specs, _, out = text
    spec = specs["prefill"]
    half = copy.deepcopy(model.qwen)  # export_graph casts the module in place
    path = export_graph(PrefillGraph(half), spec, out / "prefill_fp16.onnx", precision="fp16")
    sessions = {"prefill": ort_session(path)}
    embeds = embeds_of(model, 2, 103, seed=5)
    positions = text_positions(2, 0, 103)
    feeds = cast_feeds(spec, {"inputs_embeds": embeds, "position_ids": positions}, "fp16")
    got = run(specs, sessions, "prefill", feeds, precision="fp16")
    assert got["hidden_states"].dtype == np.float16
    hidden, logits, keys, _ = reference(model, embeds, positions)
    assert np.isfinite(got["hidden_states"]).all()
    assert cosine(got["hidden_states"], hidden) > FP16_COSINE
    assert cosine(got["logits"], logits[:, -1]) > FP16_COSINE
    assert cosine(got["present_keys"], keys) > FP16_COSINE


def test_decode_reads_each_layer_cache_where_it_lies(text, tmp_path):
    """In ONNX Runtime's optimized decode graph every cache input feeds attention's matmuls
    directly: nothing splits, slices, gathers, concatenates or transposes (i.e. copies) it per
    token. A stacked (L, ...) cache input was split into layers, a copy of the whole cache."""
    import onnx
    import onnxruntime as ort

    _, specs, _, out = text
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "decode.optimized.onnx")
    ort.InferenceSession(str(out / "decode.onnx"), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(tmp_path / "decode.optimized.onnx").graph
    layers = len(text[0].qwen.model.language_model.layers)
    for name in [n for pair in cache_names(layers) for n in pair]:
        assert name in specs["decode"].input_names
        readers = [node.op_type for node in graph.node if name in node.input]
        assert {"MatMul", "FusedMatMul"} & set(readers), (name, readers)
        assert set(readers) <= {"MatMul", "FusedMatMul", "Shape"}, (name, readers)  # no copy
