"""Checkpoint I/O: tiny round trips, the published 4b/8b key sets and configs, and bad input.

The 4b/8b key sets are written out below from the published layout (Qwen2.5-VL-3B/-7B and the
NextDiT), independently of our module: the key map must turn our `meta`-built model into exactly
these names and shapes, so one wrongly mapped 4b key fails the test without any GB-sized file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import training.checkpoint as ckpt
from training.config import from_preset
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder

# ---------------------------------------------------------------- the published layout

# (hidden, layers, heads, kv heads, FFN, tied) of Qwen2.5-VL-3B (4b) and -7B (8b).
QWEN = {"4b": (2048, 36, 16, 2, 11008, True), "8b": (3584, 28, 28, 4, 18944, False)}
VOCAB = 151668
DIT_PARAMS = {"4b": 1_362_257_824, "8b": 1_365_010_336}  # architecture.md


def published_keys(variant: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of BLIP3o-Model-4B / -8B (transformers 4.51 naming) with its shape."""
    h, layers, heads, kv, ffn, tied = QWEN[variant]
    kv_dim = kv * h // heads
    w, vffn, merged = 1280, 3420, 1280 * 4  # ViT width, ViT FFN, 2x2-merged width
    keys = {"visual.patch_embed.proj.weight": (w, 3, 2, 14, 14)}
    for i in range(32):
        p = f"visual.blocks.{i}."
        keys |= {p + "norm1.weight": (w,), p + "norm2.weight": (w,)}
        keys |= {p + "attn.qkv.weight": (3 * w, w), p + "attn.qkv.bias": (3 * w,)}
        keys |= {p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,)}
        for name, shape in (
            ("gate_proj", (vffn, w)),
            ("up_proj", (vffn, w)),
            ("down_proj", (w, vffn)),
        ):
            keys |= {p + f"mlp.{name}.weight": shape, p + f"mlp.{name}.bias": shape[:1]}
    keys |= {"visual.merger.ln_q.weight": (w,)}
    keys |= {"visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,)}
    keys |= {"visual.merger.mlp.2.weight": (h, merged), "visual.merger.mlp.2.bias": (h,)}
    keys |= {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,)}
    if not tied:
        keys["lm_head.weight"] = (VOCAB, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, out in (("q_proj", h), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            keys |= {p + f"self_attn.{name}.weight": (out, h), p + f"self_attn.{name}.bias": (out,)}
        keys |= {p + "self_attn.o_proj.weight": (h, h)}
        keys |= {p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h)}
        keys |= {p + "mlp.down_proj.weight": (h, ffn)}
        keys |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    keys["model.latent_queries"] = (1, 64, h)
    return keys | published_dit_keys(h)


def published_dit_keys(caption_width: int) -> dict[str, tuple[int, ...]]:
    d, inner, temb, heads = 1792, 4864, 1024, 28
    linear = lambda name, o, i: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}  # noqa: E731
    keys = linear("patch_embedder.proj", d, d)
    keys |= linear("caption_projection.linear_1", d, caption_width)
    keys |= linear("caption_projection.linear_2", d, d)
    keys |= linear("time_caption_embed.timestep_embedder.linear_1", temb, 256)
    keys |= linear("time_caption_embed.timestep_embedder.linear_2", temb, temb)
    keys |= {"time_caption_embed.caption_embedder.0.weight": (d,)}
    keys |= {"time_caption_embed.caption_embedder.0.bias": (d,)}
    keys |= linear("time_caption_embed.caption_embedder.1", temb, d)
    for i in range(24):
        p = f"layers.{i}."
        keys[p + "gate"] = (heads,)
        for attn in ("attn1", "attn2"):
            keys |= {f"{p}{attn}.to_{x}.weight": (d, d) for x in "qkv"}
            keys |= {f"{p}{attn}.norm_{x}.{y}": (d,) for x in "qk" for y in ("weight", "bias")}
        keys[p + "attn2.to_out.0.weight"] = (d, d)
        keys |= {p + "feed_forward.linear_1.weight": (inner, d)}
        keys |= {p + "feed_forward.linear_2.weight": (d, inner)}
        keys |= {p + "feed_forward.linear_3.weight": (inner, d)}
        keys |= linear(p + "norm1.linear", 4 * d, temb)
        for norm in ("norm1.norm", "ffn_norm1", "norm2", "ffn_norm2", "norm1_context"):
            keys[f"{p}{norm}.weight"] = (d,)
    keys |= linear("norm_out.linear_1", d, temb) | linear("norm_out.linear_2", d, d)
    return {"model.dit.model." + k: v for k, v in keys.items()}


def published_config_json(variant: str, *, nested: bool = False) -> dict:
    """config.json as the published checkpoints carry it (4.51 flat, or 5.x `text_config`)."""
    h, layers, heads, kv, ffn, tied = QWEN[variant]
    text = dict(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=ffn, vocab_size=VOCAB, rms_norm_eps=1e-6,
        max_position_embeddings=128000, tie_word_embeddings=tied, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151645, sliding_window=32768, use_sliding_window=False,
    )  # fmt: skip
    rope = {"type": "mrope", "mrope_section": [16, 24, 24]}
    vision = dict(
        depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
        in_chans=3, out_hidden_size=h, patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
        window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
        temporal_patch_size=2,
    )  # fmt: skip
    data = dict(
        architectures=["blip3oQwenForInferenceLM"], model_type="blip3o_qwen_inference",
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, vision_config=vision, torch_dtype="bfloat16",
        gen_vision_tower="eva-clip-E-14-plus", gen_hidden_size=1792, n_query=64,
        gen_pooling="early_pool2d_4",
    )  # fmt: skip
    if nested:
        rope_parameters = dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])
        return dict(data, model_type="qwen2_5_vl", tie_word_embeddings=tied,
                    text_config=dict(text, rope_parameters=rope_parameters))  # fmt: skip
    return dict(data, **text, rope_theta=1e6, rope_scaling=rope, transformers_version="4.51.3")


def to_transformers5(key: str) -> str:
    """A transformers 4.51 key of the Qwen parts as transformers 5.x names it."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "model.language_model." + key[len("model.") :]
    return key


@functools.cache
def our_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes of a variant, from a `meta`-built model."""
    model = ckpt.empty_model(from_preset(variant))
    return {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("variant", ["4b", "8b"])
def test_key_map_gives_exactly_the_published_key_set(variant):
    ours = our_shapes(variant)
    tied = QWEN[variant][-1]
    mapped = {
        ckpt.ours_to_published(n): s for n, s in ours.items() if not (tied and n == ckpt.LM_HEAD)
    }
    published = published_keys(variant)
    assert sorted(set(mapped) ^ set(published)) == []
    assert {k: s for k, s in mapped.items() if s != published[k]} == {}
    dit = sum(torch.Size(s).numel() for k, s in published.items() if k.startswith("model.dit."))
    assert dit == DIT_PARAMS[variant]
    plan = ckpt.plan_load(ours, published, tied=tied)
    assert all(ckpt.published_to_ours(k) == n and ours[n] == published[k] for k, n in plan.items())
    assert len(plan) == len(published)


def test_plan_load_accepts_transformers5_names_and_ignores_training_towers(caplog):
    ours = our_shapes("4b")
    renamed = {to_transformers5(k): shape for k, shape in published_keys("4b").items()}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in renamed
    extra = {"model.gen_vision_tower.blocks.0.weight": (4,), "model.vae.decoder.conv.weight": (4,)}
    with caplog.at_level(logging.DEBUG, logger="training.checkpoint"):
        plan = ckpt.plan_load(ours, renamed | extra, tied=True)
    assert set(plan) == set(renamed)
    assert plan == {k: ckpt.published_to_ours(k) for k in renamed}
    assert sorted(plan.values()) == sorted(set(ours) - {ckpt.LM_HEAD})
    assert "model.gen_vision_tower.blocks.0.weight" in caplog.text and "model.vae." in caplog.text


@pytest.mark.parametrize(
    ("key", "shape", "match"),
    [
        ("model.layers.35.mlp.down_proj.weight", None, r"missing.*'model\.layers\.35\.mlp\.down"),
        ("model.layers.36.mlp.up_proj.weight", (11008, 2048), r"unexpected.*'model\.layers\.36\."),
        ("model.dit.extra.weight", (1,), r"unexpected.*'model\.dit\.extra\.weight'"),
        (
            "model.dit.model.layers.0.gate",
            (16,),
            r"layers\.0\.gate: checkpoint \(16,\), model \(28,\)",
        ),
        ("model.layers.0.self_attn.k_proj.weight", (2048, 2048), r"k_proj\.weight: checkpoint"),
    ],
    ids=["missing", "extra-layer", "unknown-prefix", "misshaped-gate", "misshaped-kv"],
)
def test_plan_load_names_bad_4b_keys(key, shape, match):
    ours = our_shapes("4b")
    keys = published_keys("4b")
    if shape is None:
        del keys[key]
    else:
        keys[key] = shape
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.plan_load(ours, keys, tied=True)


# ---------------------------------------------------------------- config.json


@pytest.mark.parametrize("variant", ["4b", "8b"])
@pytest.mark.parametrize("nested", [False, True], ids=["transformers4.51", "text_config"])
def test_read_config_of_published_checkpoints(tmp_path, variant, nested):
    (tmp_path / "config.json").write_text(json.dumps(published_config_json(variant, nested=nested)))
    assert ckpt.read_config(tmp_path) == from_preset(variant)


def test_read_config_names_a_mismatching_field(tmp_path):
    data = published_config_json("4b") | {"num_hidden_layers": 28}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ckpt.CheckpointError, match=r"num_hidden_layers = 28.*'4b'.*36"):
        ckpt.read_config(tmp_path)
    data = published_config_json("8b") | {"hidden_size": 4096}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ckpt.CheckpointError, match=r"unknown variant.*4096.*2048 \(4b\)"):
        ckpt.read_config(tmp_path)
    data = published_config_json("8b")
    data["vision_config"]["out_hidden_size"] = 2048
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ckpt.CheckpointError, match=r"vision_config.out_hidden_size = 2048.*3584"):
        ckpt.read_config(tmp_path)


def test_read_config_rejects_bad_folders(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_config(tmp_path / "nowhere")
    with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path}.* has no config.json"):
        ckpt.read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 2048}))
    with pytest.raises(ckpt.CheckpointError, match=r"'llama'.*blip3o_qwen, blip3o_qwen_inference"):
        ckpt.read_config(tmp_path)


def test_written_config_is_published_form_and_round_trips(tmp_path):
    for variant in ("tiny", "4b", "8b"):
        cfg = from_preset(variant)
        data = ckpt.published_config(cfg, torch.bfloat16)  # torch_dtype as published
        assert data["model_type"] == "blip3o_qwen_inference" and data["torch_dtype"] == "bfloat16"
        assert data["hidden_size"] == cfg.backbone.hidden_size and "vision_config" in data
        assert data["rope_scaling"]["mrope_section"] == list(cfg.backbone.mrope_section)
        (tmp_path / "config.json").write_text(json.dumps(data))
        assert ckpt.read_config(tmp_path) == cfg
        if variant != "tiny":  # without our field, the published numbers alone decide
            del data["blip3o_edge"]
            (tmp_path / "config.json").write_text(json.dumps(data))
            assert ckpt.read_config(tmp_path) == cfg
            published = published_config_json(variant)  # every published number is written
            optional = {"sliding_window", "use_sliding_window", "transformers_version"}
            assert set(published) - set(data) == optional
            assert {k: data[k] for k in published if k in data} == {
                k: v for k, v in published.items() if k not in optional
            }


# ---------------------------------------------------------------- tiny save / load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_config, tiny_tokenizer):
    """A seeded tiny model + decoder, saved once in 5 shards: (model, decoder, folder)."""
    torch.manual_seed(0)
    model, decoder = BLIP3o(tiny_config).eval(), Decoder(tiny_config.decoder).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    ckpt.save_model(model, folder, tokenizer=tiny_tokenizer, decoder=decoder, max_shard_size="2MB")
    return model, decoder, folder


def outputs(model: BLIP3o, decoder: Decoder) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    cfg = model.config
    ids = torch.tensor([[1, 2, 30, 40, 50, cfg.backbone.img_token_id]])
    with torch.no_grad():
        cond = model.conditioning(ids)  # (1, 64, H)
        x = torch.randn(1, cfg.dit.in_channels, 8, 8, generator=gen)
        velocity = model.velocity(x, torch.tensor([700]), cond)
        latents = torch.randn(1, 4, cfg.decoder.latent_size, cfg.decoder.latent_size, generator=gen)
        features = torch.randn(1, 64, cfg.feature_width, generator=gen)
        eps = decoder.epsilon(latents, torch.tensor([500]), features)
    return [cond, velocity, eps]


def test_tiny_round_trip_is_exact(tiny):
    model, decoder, folder = tiny
    pipe = ckpt.load_pipeline(folder)
    loaded = pipe.model
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(
        torch.equal(x, y) for (_, x), (_, y) in zip(model.named_buffers(), loaded.named_buffers())
    )
    assert loaded.qwen.lm_head.weight is loaded.qwen.model.language_model.embed_tokens.weight
    # the weights are bit-equal (above); outputs only to float32 rounding: tensors read back from
    # safetensors may sit at other alignments, and some CPUs' kernels then round differently
    for want, got in zip(outputs(model, decoder), outputs(loaded, pipe.decoder)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_saved_keys_use_published_names(tiny):
    model, _, folder = tiny
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 5 and shards[-1] == f"model-{n:05d}-of-{n:05d}.safetensors"
    assert all((folder / name).is_file() for name in shards)
    for key in (
        "model.latent_queries",
        "model.dit.model.layers.0.gate",
        "visual.patch_embed.proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
    ):
        assert key in keys
    assert "lm_head.weight" not in keys  # tied in tiny
    assert not any(k.startswith(("qwen.", "dit.")) for k in keys)
    assert len(keys) == len(model.state_dict()) - 1
    assert {p.name for p in (folder / "diffusion-decoder").iterdir()} >= {
        "unet",
        "vae",
        "scheduler",
    }
    assert (folder / "tokenizer.json").is_file()


def rewrite(src, dst, edit=None, config=None):
    """Copy a checkpoint to one model.safetensors after `edit(tensors)`, config.json updated."""
    dst.mkdir()
    tensors = {}
    for path in sorted(src.glob("*.safetensors")):
        tensors |= load_file(path)
    if edit is not None:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    data = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(data | (config or {})))
    return dst


def test_transformers5_names_and_ignored_keys_load(tiny, tmp_path, caplog):
    model, _, folder = tiny

    def to_v5(t):
        for key in list(t):
            t[to_transformers5(key)] = t.pop(key)
        t["model.gen_vision_tower.vision_tower.blocks.0.weight"] = torch.ones(3)
        t["model.vae.decoder.conv_in.weight"] = torch.ones(3)

    dst = rewrite(folder, tmp_path / "v5", to_v5)
    written = load_file(dst / "model.safetensors")
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in written
    assert (
        "model.visual.patch_embed.proj.weight" in written
        and "visual.merger.ln_q.weight" not in written
    )
    with caplog.at_level(logging.DEBUG, logger="training.checkpoint"):
        loaded = ckpt.load_model(dst, variant="tiny")
    assert "model.gen_vision_tower.vision_tower.blocks.0.weight" in caplog.text
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _drop(t):
    del t["model.layers.1.mlp.up_proj.weight"]


def _add(t):
    t["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)


def _reshape(t):
    t["model.latent_queries"] = torch.zeros(1, 64, 64)


@pytest.mark.parametrize(
    ("edit", "config", "match"),
    [
        (_drop, None, r"missing tensor.*'model\.layers\.1\.mlp\.up_proj\.weight'"),
        (_add, None, r"unexpected tensor.*'model\.layers\.9\.mlp\.up_proj\.weight'"),
        (_reshape, None, r"model\.latent_queries: checkpoint \(1, 64, 64\), model \(1, 64, 128\)"),
        (None, {"model_type": "llava"}, r"'llava', not BLIP3-o"),
    ],
    ids=["missing", "unexpected", "misshaped", "model_type"],
)
def test_load_rejects_bad_checkpoints(tiny, tmp_path, edit, config, match):
    dst = rewrite(tiny[2], tmp_path / "bad", edit, config)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_model(dst)


def test_load_names_parameters_left_on_meta(tiny, monkeypatch):
    plan_load = ckpt.plan_load

    def forgetful_plan(*args, **kwargs):
        plan = plan_load(*args, **kwargs)
        del plan["model.dit.model.norm_out.linear_2.bias"]
        return plan

    monkeypatch.setattr(ckpt, "plan_load", forgetful_plan)
    with pytest.raises(
        ckpt.CheckpointError, match=r"still on meta.*'dit\.norm_out\.linear_2\.bias'"
    ):
        ckpt.load_model(tiny[2])


def test_load_rejects_wrong_variant_and_missing_weights(tiny, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"holds the 'tiny' variant, not '4b'"):
        ckpt.load_model(tiny[2], variant="4b")
    with pytest.raises(ValueError, match=r"unknown variant '3b'.*tiny, 4b, 8b"):
        ckpt.load_model(tiny[2], variant="3b")
    with pytest.raises(ValueError, match=r"floating torch.dtype, got torch.int8"):
        ckpt.load_model(tiny[2], dtype=torch.int8)
    (tmp_path / "config.json").write_bytes((tiny[2] / "config.json").read_bytes())
    with pytest.raises(ckpt.CheckpointError, match="neither model.safetensors.index.json nor"):
        ckpt.load_model(tmp_path)


# ---------------------------------------------------------------- atomic save, hashing


def test_interrupted_save_leaves_the_old_checkpoint(tiny, tmp_path, monkeypatch):
    model, _, folder = tiny
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    before = ckpt.checkpoint_hash(target)
    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_model(model, target, max_shard_size="2MB")
    assert ckpt.checkpoint_hash(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    ckpt.save_model(model, target)  # a complete save replaces it: one file, no shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def test_checkpoint_hash_tracks_content(tiny, tmp_path):
    folder = tiny[2]
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert ckpt.checkpoint_hash(copy) == ckpt.checkpoint_hash(folder)
    assert len(ckpt.checkpoint_hash(copy)) == 64
    (copy / "tokenizer.json").write_text("{}")
    assert ckpt.checkpoint_hash(copy) != ckpt.checkpoint_hash(folder)
    path = folder / "config.json"
    assert ckpt.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.checkpoint_hash(tmp_path / "nowhere")
