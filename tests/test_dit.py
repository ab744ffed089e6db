"""The NextDiT: published parameter counts, the RoPE table, parity with diffusers' Lumina-Next."""

import pytest
import torch

from training.config import from_preset
from training.model.dit import NextDiTCrossAttn
from training.model.rope import apply_rope, rope_angles, rope_cos_sin


@pytest.mark.parametrize(("variant", "count"), [("8b", 1_365_010_336), ("4b", 1_362_257_824)])
def test_parameter_count_on_meta(variant, count):
    with torch.device("meta"):
        dit = NextDiTCrossAttn(from_preset(variant).dit)
    assert sum(p.numel() for p in dit.parameters()) == count


def test_published_key_names():
    with torch.device("meta"):
        keys = set(NextDiTCrossAttn(from_preset("4b").dit).state_dict())
    for key in [
        "patch_embedder.proj.weight",
        "caption_projection.linear_1.weight",
        "time_caption_embed.timestep_embedder.linear_1.weight",
        "time_caption_embed.caption_embedder.1.weight",
        "layers.23.attn1.norm_q.weight",
        "layers.0.attn2.to_out.0.weight",
        "layers.0.feed_forward.linear_3.weight",
        "layers.0.norm1.linear.weight",
        "layers.0.norm1_context.weight",
        "layers.0.ffn_norm2.weight",
        "layers.0.gate",
        "norm_out.linear_2.bias",
    ]:
        assert key in keys, key
    assert "layers.0.attn1.to_out.0.weight" not in keys


def _complex_rope(head_dim, height, width, theta=10000.0):
    """Direct complex-number construction: the reference's 384x384 table, cropped."""
    dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
    table_h = torch.polar(
        torch.ones(384, dim // 2, dtype=torch.float64),
        torch.outer(torch.arange(384.0, dtype=torch.float64), freqs),
    )
    rows = table_h[:, None, :, None].expand(384, 384, dim // 2, 1)
    cols = table_h[None, :, :, None].expand(384, 384, dim // 2, 1)
    table = torch.cat([rows, cols], dim=-1).flatten(2)  # (384, 384, D/2)
    return table[:height, :width].flatten(0, 1)  # (S, D/2)


def test_rope_table_matches_complex_computation():
    angles = rope_angles(64, 8, 8)
    ref = _complex_rope(64, 8, 8)
    torch.testing.assert_close(torch.polar(torch.ones_like(angles), angles), ref)
    # and the rotation equals a complex multiplication of channel pairs
    x = torch.randn(2, 64, 3, 64)
    cos, sin = rope_cos_sin(64, 8, 8)
    expected = torch.view_as_real(
        torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * ref[None, :, None]
    ).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected.float(), atol=1e-5, rtol=1e-5)


def test_rope_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_angles(30, 8, 8)


def test_tiny_forward_shape_and_bad_grid():
    cfg = from_preset("tiny")
    dit = NextDiTCrossAttn(cfg.dit)
    out = dit(torch.randn(3, 32, 8, 8), torch.tensor([1000, 500, 1]), torch.randn(3, 64, 128))
    assert out.shape == (3, 32, 8, 8)
    with pytest.raises(ValueError, match="8x8 feature grid"):
        dit(torch.randn(1, 32, 4, 4), torch.tensor([1]), torch.randn(1, 64, 128))


def test_parity_with_diffusers_lumina_next():
    """Our module == diffusers' LuminaNextDiT2DModel fed our caption projection's output.

    BLIP3-o's DiT is diffusers' Lumina-Next with a caption projection in front; every other
    weight loads into diffusers' model by name (diffusers also has an unused `pad_token`).
    """
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    cfg = from_preset("tiny").dit
    torch.manual_seed(0)
    ours = NextDiTCrossAttn(cfg).eval()
    for p in ours.parameters():  # gates and adaLN start at zero: randomize everything
        torch.nn.init.normal_(p, std=0.05)
    ref = diffusers.LuminaNextDiT2DModel(
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        hidden_size=cfg.dim,
        num_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_kv_heads=cfg.n_kv_heads,
        multiple_of=cfg.multiple_of,
        ffn_dim_multiplier=None,
        norm_eps=cfg.norm_eps,
        learn_sigma=False,
        qk_norm=True,
        cross_attention_dim=cfg.dim,
    ).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("caption_projection")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert missing == ["pad_token"] and unexpected == []
    x, t, z = (
        torch.randn(2, cfg.in_channels, 8, 8),
        torch.tensor([967, 33]),
        torch.randn(2, 64, 128),
    )
    freqs = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)
    with torch.no_grad():
        expected = ref(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=ours.caption_projection(z),
            encoder_mask=torch.ones(2, 64),
            image_rotary_emb=freqs,
            cross_attention_kwargs={},
        ).sample
        got = ours(x, t, z)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
