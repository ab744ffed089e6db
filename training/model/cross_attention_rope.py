"""2-D rotary positions in the decoder UNet's cross-attention (a `tiny`-only option, no weights).

Emu2-Gen's UNet reads the 64 target features through cross-attention only, and neither side of
that attention carries a position: the features are a bag of tokens, and the UNet's latent pixels
know where they are only through what zero padding tells its convolutions. SDXL-sized training
learns that; the `tiny` decoder's ~30 CPU-minutes do not (it paints the right colors in the wrong
places and counts). With `DecoderConfig.cross_attention_rope` every cross-attention (`attn2`)
rotates its queries by their pixel's place and its keys by their token's place on the 8x8
feature grid (RoPE, as in RoFormer, split over rows and columns), so a pixel can attend to the
tokens around it from the first step. Parameter-free: the UNet's weights and diffusers folder are
unchanged; only the attention computation differs. 4b/8b keep diffusers' processor, as published.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def axis_angles(positions: torch.Tensor, n_freq: int) -> torch.Tensor:
    """Rotation angles (N, n_freq) of positions in grid cells: pi/2, pi/4, ... rad per cell."""
    exponents = torch.arange(n_freq, dtype=torch.float32, device=positions.device)
    freqs = (math.pi / 2) * 2.0**-exponents
    return positions[:, None] * freqs[None]


def grid_angles(side: int, grid: int, head_dim: int, device=None) -> torch.Tensor:
    """Angles (side*side, head_dim/2) of a row-major side x side map laid over a grid x grid frame.

    Cell centres are mapped onto the frame's cell coordinates, so a 16x16 latent pixel and the 8x8
    feature token it lies in get nearby positions. The first half of the pairs rotate with the
    row, the second half with the column.
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary positions need a head dim divisible by 4, got {head_dim}")
    centres = (torch.arange(side, dtype=torch.float32, device=device) + 0.5) * grid / side - 0.5
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    n_freq = head_dim // 4
    return torch.cat([axis_angles(rows.flatten(), n_freq), axis_angles(cols.flatten(), n_freq)], 1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, heads, N, D) by angles (N, D/2), on x's device."""
    angles = angles.to(x.device)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cross-attention rope needs a square {what}, got {n} positions")
    return side


class RopeCrossAttnProcessor:
    """diffusers attention processor: scaled dot-product cross-attention with 2-D RoPE."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):  # fmt: skip
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("RopeCrossAttnProcessor serves unmasked cross-attention only")
        b, n, _ = hidden_states.shape  # (B, h*w, C): a Transformer2DModel's flattened map
        m = encoder_hidden_states.shape[1]  # 64 target feature tokens, row-major 8x8
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        d = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, attn.heads, d).transpose(1, 2)  # (B, heads, N, d)

        grid = square_side(m, "feature grid")
        dev = query.device
        query = rotate(heads(query), grid_angles(square_side(n, "latent map"), grid, d, dev))
        key = rotate(heads(key), grid_angles(grid, grid, d, dev))
        out = F.scaled_dot_product_attention(query, key, heads(value))
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def install_cross_attention_rope(unet) -> int:
    """Give every cross-attention (`...attn2`) of a diffusers UNet the rotary processor.

    Returns how many were replaced (self-attention keeps its processor).
    """
    processors = dict(unet.attn_processors)
    cross = [name for name in processors if name.endswith("attn2.processor")]
    for name in cross:
        processors[name] = RopeCrossAttnProcessor()
    unet.set_attn_processor(processors)
    return len(cross)
