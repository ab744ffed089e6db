"""Checkpoints written the way BLIP3-o publishes them load unmodified (tiny, and 4b config forms).

`training.published.write_published` writes bf16 tensors in HF-named shards with an index, the
transformers 4.51 config (`blip3o_qwen`, `rope_scaling` type `default`), ignored training towers,
the decoder as diffusers' bf16 variant and a tokenizer without `tokenizer.json`; the loader must
read all of it and give back the model, rounded to bf16.
"""

from __future__ import annotations

import json

import pytest
import torch

import training.checkpoint as ckpt
from training.checkpoint_config import read_config
from training.config import depth_label, from_preset, reduced_depth, to_dict
from training.decoder_folder import load_decoder
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.published import training_config, write_published
from training.tokenizer import tiny_corpus

TEXTS = [
    *tiny_corpus()[:40],
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPlease generate",
    "a 12 red  circles\n\nit's <|vision_start|><|image_pad|><|vision_end|>[IMG]",
]


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_config, tiny_tokenizer):
    """A seeded tiny model + decoder written in the published form: (model, decoder, folder)."""
    torch.manual_seed(3)
    model, decoder = BLIP3o(tiny_config).eval(), Decoder(tiny_config.decoder).eval()
    folder = tmp_path_factory.mktemp("published") / "BLIP3o-Model-tiny"
    write_published(model, decoder, tiny_tokenizer, folder, max_shard_bytes=1 << 20)
    return model, decoder, folder


def _bf16(state: dict) -> dict:
    return {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
            for k, v in state.items()}  # fmt: skip


def test_the_folder_is_in_the_published_form(published):
    _, _, folder = published
    names = sorted(p.name for p in folder.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "tokenizer.json" not in names and {"vocab.json", "merges.txt"} <= set(names)
    data = json.loads((folder / "config.json").read_text())
    assert data["model_type"] == "blip3o_qwen" and "blip3o_edge" not in data
    assert data["rope_scaling"]["type"] == "default" and data["torch_dtype"] == "bfloat16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert any(k.startswith("model.gen_vision_tower.") for k in index["weight_map"])
    assert index["metadata"]["total_size"] > 0
    unet = sorted(p.name for p in (folder / "diffusion-decoder" / "unet").iterdir())
    assert unet == ["config.json", "diffusion_pytorch_model.bf16.safetensors"]


def test_published_tiny_loads_unmodified(published, tiny_config, tiny_tokenizer):
    model, decoder, folder = published
    assert read_config(folder) == tiny_config  # tiny is told by its hidden size
    pipe = ckpt.load_pipeline(folder)
    want, got = _bf16(model.state_dict()), pipe.model.state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    qwen = pipe.model.qwen
    assert qwen.lm_head.weight is qwen.model.language_model.embed_tokens.weight
    for ours, loaded in ((decoder.unet, pipe.decoder.unet), (decoder.vae, pipe.decoder.vae)):
        a, b = _bf16(ours.state_dict()), loaded.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    for text in TEXTS:  # the fast tokenizer built from vocab.json + merges.txt
        assert pipe.tokenizer.encode(text).ids == tiny_tokenizer.encode(text).ids, text


def test_parts_load_only_their_tensors(published):
    model, decoder, folder = published
    dit_only = ckpt.load_model(folder, parts=("dit.",))
    assert not dit_only.dit.norm_out.linear_2.weight.is_meta
    assert dit_only.qwen.model.language_model.layers[0].mlp.up_proj.weight.is_meta
    assert dit_only.latent_queries.is_meta
    want = _bf16(model.dit.state_dict())
    assert all(torch.equal(want[k], v) for k, v in dit_only.dit.state_dict().items())
    head = ckpt.load_model(folder, parts=("qwen.lm_head.",), dtype=torch.float16)
    assert head.qwen.lm_head.weight.dtype == torch.float16 and not head.qwen.lm_head.weight.is_meta
    vae_only = load_decoder(decoder.config, folder / "diffusion-decoder", parts=("vae",))
    assert vae_only.unet.conv_in.weight.is_meta and not vae_only.vae.decoder.conv_in.weight.is_meta


def test_an_untied_head_loads_from_its_own_tensor(tmp_path, tiny_config, tiny_tokenizer):
    import dataclasses

    cfg = dataclasses.replace(
        tiny_config, backbone=dataclasses.replace(tiny_config.backbone, tie_word_embeddings=False)
    )
    torch.manual_seed(4)
    model, decoder = BLIP3o(cfg).eval(), Decoder(cfg.decoder).eval()
    folder = write_published(model, decoder, tiny_tokenizer, tmp_path / "untied")
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(data | {"blip3o_edge": to_dict(cfg)}))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]
    loaded = ckpt.load_model(folder)
    head, embed = loaded.qwen.lm_head.weight, loaded.qwen.model.language_model.embed_tokens.weight
    assert head is not embed and not torch.equal(head, embed)
    assert torch.equal(head, model.qwen.lm_head.weight.to(torch.bfloat16).float())


def test_reduced_depth_keeps_the_real_widths():
    full, cfg = from_preset("4b"), reduced_depth("4b", 2)
    b = cfg.backbone
    assert (b.num_layers, b.vision.depth, cfg.dit.n_layers) == (2, 2, 2)
    assert b.vision.fullatt_block_indexes == (1,)
    assert (b.hidden_size, b.intermediate_size, b.vocab_size, b.num_heads, b.num_kv_heads) == (
        2048, 11008, 151668, 16, 2,
    )  # fmt: skip
    assert cfg.dit.dim == full.dit.dim and cfg.dit.ffn_inner_dim == full.dit.ffn_inner_dim
    assert cfg.decoder.transformer_layers_per_block == (1, 2, 2)
    assert cfg.decoder.block_out_channels == full.decoder.block_out_channels
    assert (depth_label(full), depth_label(cfg)) == ("4b", "4b-L2")
    assert reduced_depth(full, 36) == full
    with pytest.raises(ValueError, match=r"layers must be an integer in \[1, 36\] for 4b, got 0"):
        reduced_depth("4b", 0)


@pytest.mark.parametrize("variant", ["4b", "8b"])
def test_reduced_depth_published_config_reads_back_with_layers(tmp_path, variant):
    cfg = reduced_depth(variant, 1)
    (tmp_path / "config.json").write_text(json.dumps(training_config(cfg)))
    assert read_config(tmp_path, layers=1) == cfg
    with pytest.raises(ckpt.CheckpointError, match=r"num_hidden_layers = 1.*layers=1\)"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(training_config(from_preset(variant))))
    assert read_config(tmp_path) == from_preset(variant)  # the full published config
