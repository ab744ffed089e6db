"""2-D rotary position embedding of the NextDiT, as real cos/sin tables.

The reference (diffusers' Lumina-Next) builds a complex table on a 384x384 grid and multiplies
q/k viewed as complex numbers; ONNX has no complex tensors, so we build the same angles as real
cos/sin and rotate adjacent (even, odd) channel pairs. Per head of width D there are D/2 rotated
pairs: pair 2k turns with the row index at frequency k, pair 2k+1 with the column index at
frequency k, for k < D/4, with frequency k = theta ** (-4k / D).
"""

from __future__ import annotations

import torch


def rope_angles(head_dim: int, height: int, width: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of each (token, channel pair): (height*width, head_dim/2), row-major tokens.

    Cropping the reference's 384x384 table to the top-left (height, width) block gives exactly
    these angles, so the table is built at the size used.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    exponent = torch.arange(0, 2 * quarter, 2, dtype=torch.float64) / (2 * quarter)
    freqs = 1.0 / theta**exponent  # (D/4,)
    rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width).reshape(-1)
    cols = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width).reshape(-1)
    row_angles = rows[:, None] * freqs[None, :]  # (S, D/4)
    col_angles = cols[:, None] * freqs[None, :]  # (S, D/4)
    # interleave: pair 2k <- row frequency k, pair 2k+1 <- column frequency k
    return torch.stack([row_angles, col_angles], dim=-1).reshape(height * width, 2 * quarter)


def rope_cos_sin(
    head_dim: int, height: int, width: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) tables, each (height*width, head_dim/2)."""
    angles = rope_angles(head_dim, height, width, theta)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, S, heads, D) by the (S, D/2) angle tables.

    Computed in float32 (as the reference does) and returned in x's dtype, as
    `x * [c, c] + swap(x) * [-s, s]` per pair (swap: (even, odd) -> (odd, even)): half the
    multiplies of rotating the halves separately, which made RoPE a sixth of a DiT training step.
    """
    dtype = x.dtype
    x = x.float()
    cos2 = cos.repeat_interleave(2, dim=-1)[None, :, None, :]  # (1, S, 1, D): c0 c0 c1 c1 ...
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)[None, :, None, :]  # -s0 s0 -s1 s1 ...
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (B, S, heads, D)
    return (x * cos2 + swapped * sin2).to(dtype)
