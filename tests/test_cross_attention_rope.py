"""The decoder UNet's 2-D rotary cross-attention (tiny only): placement, equivalence, install."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from training.config import from_preset
from training.model.cross_attention_rope import (
    RopeCrossAttnProcessor,
    grid_angles,
    install_cross_attention_rope,
    rotate,
)
from training.model.decoder import Decoder


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    angles = grid_angles(8, 8, 16)  # (64, 8)

    def score(i: int, j: int) -> float:
        return float((rotate(q, angles[i : i + 1]) * rotate(k, angles[j : j + 1])).sum())

    # (row 1, col 2) vs (row 3, col 5) and the same offset moved by (+2, +1)
    assert score(1 * 8 + 2, 3 * 8 + 5) == pytest.approx(score(3 * 8 + 3, 5 * 8 + 6), abs=1e-5)
    assert score(0, 9) != pytest.approx(score(0, 18), abs=1e-3)


def test_rotation_follows_the_tensor_device_and_dtype():
    x = torch.empty(2, 4, 64, 16, device="meta", dtype=torch.float16)  # e.g. a CUDA fp16 UNet
    out = rotate(x, grid_angles(8, 8, 16))  # angles are made on the CPU
    assert out.device == x.device and out.dtype == torch.float16 and out.shape == x.shape


def test_latent_pixels_land_on_their_feature_token():
    fine, coarse = grid_angles(16, 8, 16), grid_angles(8, 8, 16)
    # latent pixels (2, 4) and (3, 5) of 16x16 lie in feature cell (1, 2): within half a cell
    for r, c in ((2, 4), (3, 5)):
        delta = fine[r * 16 + c] - coarse[1 * 8 + 2]
        assert delta.abs().max() <= torch.pi / 2 * 0.25 + 1e-6
    assert torch.equal(grid_angles(8, 8, 16), coarse)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_angles(8, 8, 6)
    attn = Attention(16, cross_attention_dim=8, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="square latent map"):
        RopeCrossAttnProcessor()(attn, torch.randn(1, 10, 16), torch.randn(1, 64, 8))


def test_processor_equals_diffusers_when_positions_coincide():
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    x, ctx = torch.randn(2, 1, 16), torch.randn(2, 1, 8)  # one pixel, one token: same place
    expected = AttnProcessor2_0()(attn, x, ctx)
    torch.testing.assert_close(RopeCrossAttnProcessor()(attn, x, ctx), expected)


def test_tiny_decoder_uses_it_and_the_large_presets_do_not():
    tiny = Decoder(from_preset("tiny").decoder)
    kinds = {name: type(p).__name__ for name, p in tiny.unet.attn_processors.items()}
    cross = [n for n in kinds if n.endswith("attn2.processor")]
    assert cross and all(kinds[n] == "RopeCrossAttnProcessor" for n in cross)
    assert all(kinds[n] != "RopeCrossAttnProcessor" for n in kinds if n not in cross)
    assert from_preset("4b").decoder.cross_attention_rope is False
    assert from_preset("8b").decoder.cross_attention_rope is False


def test_positions_change_the_unet_output_and_weights_stay_the_same():
    cfg = from_preset("tiny").decoder
    torch.manual_seed(0)
    with_rope = Decoder(cfg).eval()
    plain = Decoder(dataclasses.replace(cfg, cross_attention_rope=False)).eval()
    plain.load_state_dict(with_rope.state_dict())  # same parameter names and shapes
    latents = torch.randn(1, 4, cfg.latent_size, cfg.latent_size)
    features = torch.randn(1, 64, cfg.cross_attention_dim)
    t = torch.tensor([500])
    with torch.no_grad():
        a, b = with_rope.epsilon(latents, t, features), plain.epsilon(latents, t, features)
    assert (a - b).abs().max() > 1e-3
    assert install_cross_attention_rope(plain.unet) == len(
        [n for n in plain.unet.attn_processors if n.endswith("attn2.processor")]
    )
    with torch.no_grad():
        torch.testing.assert_close(plain.epsilon(latents, t, features), a)
