"""`NextDiTCrossAttn`: BLIP3-o's flow-matching transformer over the 8x8 grid of CLIP features.

A Lumina-Next DiT (diffusers <= 0.32 `LuminaNextDiT2DModel` as modified by BLIP3-o) written as
our own module so that it exports cleanly: real cos/sin RoPE instead of complex tensors, no
attention processors, no masks (BLIP3-o's masks are all ones). Submodule names equal the
published checkpoint's keys after stripping `model.dit.model.`.

Per block: sandwich RMSNorms with tanh-gated adaLN; self-attention (2-D RoPE on q and k) and
cross-attention to the projected queries (RoPE on q only) share one normed input; the
cross-attention output is scaled per head by tanh(gate) and added to the self-attention output
before a single output projection (`attn2.to_out.0`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.config import DiTConfig
from training.model.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, weight named `weight` (diffusers' layout)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * in_channels, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3)  # (B,h,w,Cpp)
        return self.proj(x).flatten(1, 2)  # (B, S, dim)


class CaptionProjection(nn.Module):
    """Linear -> GELU(tanh) -> Linear, from the backbone width to the DiT width."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim, bias=True)
        self.linear_2 = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim, bias=True)
        self.linear_2 = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (flip_sin_to_cos, no frequency shift): (B, dim)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half
    args = timestep.float()[:, None] * exponent.exp().to(timestep.device)[None, :]  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimeCaptionEmbed(nn.Module):
    """temb = MLP(sinusoid(t)) + Linear(LayerNorm(mean of projected caption))."""

    def __init__(self, dim: int, embed_dim: int, frequency_dim: int) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.timestep_embedder = TimestepEmbedder(frequency_dim, embed_dim)
        self.caption_embedder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, embed_dim))

    def forward(
        self, timestep: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor | None
    ) -> torch.Tensor:
        weight = self.timestep_embedder.linear_1.weight
        t_emb = self.timestep_embedder(timestep_sinusoid(timestep, self.frequency_dim).to(weight))
        if caption_mask is None:
            pooled = caption.float().mean(dim=1)  # (B, dim)
        else:
            m = caption_mask.float().unsqueeze(-1)  # (B, L, 1)
            pooled = (caption.float() * m).sum(dim=1) / m.sum(dim=1)
        return t_emb + self.caption_embedder(pooled.to(caption.dtype))  # (B, embed_dim)


class Attention(nn.Module):
    """q/k/v projections with LayerNorm across all heads of q and k; returns (B, S, heads, D)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, kv_heads: int, with_out: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.to_q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, kv_heads * self.head_dim, bias=False)
        self.norm_q = nn.LayerNorm(heads * self.head_dim, eps=1e-5)
        self.norm_k = nn.LayerNorm(kv_heads * self.head_dim, eps=1e-5)
        if with_out:
            self.to_out = nn.ModuleList([nn.Linear(heads * self.head_dim, dim, bias=False)])

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rope_on_key: bool,
    ) -> torch.Tensor:
        b = x.shape[0]
        q = self.norm_q(self.to_q(x)).view(b, -1, self.heads, self.head_dim)  # (B, S, H, D)
        k = self.norm_k(self.to_k(context)).view(b, -1, self.kv_heads, self.head_dim)
        v = self.to_v(context).view(b, -1, self.kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        if rope_on_key:
            k = apply_rope(k, cos, sin)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=2)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, S, H, D)


class FeedForward(nn.Module):
    """SwiGLU with three bias-free linears: linear_2(silu(linear_1 x) * linear_3 x)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, inner, bias=False)
        self.linear_2 = nn.Linear(inner, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x).float()).to(x.dtype) * self.linear_3(x))


class AdaRMSNormZero(nn.Module):
    """RMSNorm modulated by temb: returns the normed input and (gate_msa, scale_mlp, gate_mlp)."""

    def __init__(self, dim: int, embed_dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, 4 * dim, bias=True)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(4, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class NextDiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.gate = nn.Parameter(torch.zeros(cfg.n_heads))
        self.attn1 = Attention(dim, dim, cfg.n_heads, cfg.n_kv_heads, with_out=False)
        self.attn2 = Attention(dim, dim, cfg.n_heads, cfg.n_kv_heads, with_out=True)
        self.feed_forward = FeedForward(dim, cfg.ffn_inner_dim)
        self.norm1 = AdaRMSNormZero(dim, cfg.time_embed_dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.norm1_context = RMSNorm(dim, cfg.norm_eps)

    def forward(self, x, context, temb, cos, sin):
        normed, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)  # (B, S, dim)
        self_attn = self.attn1(normed, normed, cos, sin, rope_on_key=True)  # (B, S, H, D)
        cross = self.attn2(normed, self.norm1_context(context), cos, sin, rope_on_key=False)
        mixed = self_attn + cross * self.gate.tanh().view(1, 1, -1, 1)
        h = self.attn2.to_out[0](mixed.flatten(-2))  # (B, S, dim)
        x = x + gate_msa.unsqueeze(1).tanh() * self.norm2(h)
        mlp = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
        return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(mlp)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) * (1 + Linear(SiLU(temb))) -> Linear to patch pixels."""

    def __init__(self, dim: int, embed_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(embed_dim, dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear_2 = nn.Linear(dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb).to(x.dtype))
        return self.linear_2(self.norm(x) * (1 + scale)[:, None, :])


class NextDiTCrossAttn(nn.Module):
    """Velocity v(x_t, t, queries) of flow matching over (B, C, 8, 8) target-feature grids."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        p = cfg.patch_size
        self.patch_embedder = PatchEmbed(p, cfg.in_channels, cfg.dim)
        self.caption_projection = CaptionProjection(cfg.latent_embedding_size, cfg.dim)
        self.time_caption_embed = TimeCaptionEmbed(
            cfg.dim, cfg.time_embed_dim, cfg.timestep_frequency_dim
        )
        self.layers = nn.ModuleList([NextDiTBlock(cfg) for _ in range(cfg.n_layers)])
        self.norm_out = FinalLayer(cfg.dim, cfg.time_embed_dim, p * p * cfg.in_channels)
        side = cfg.input_size // p
        cos, sin = rope_cos_sin(cfg.head_dim, side, side, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (S, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        z_latents: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, h, w) noisy features; timestep (B,) = 1000*sigma; z_latents (B, 64, H_llm)."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        if h != self.config.input_size or w != self.config.input_size:
            side = self.config.input_size
            raise ValueError(f"the DiT takes a {side}x{side} feature grid, got {h}x{w}")
        tokens = self.patch_embedder(x)  # (B, S, dim)
        context = self.caption_projection(z_latents)  # (B, 64, dim)
        temb = self.time_caption_embed(timestep, context, caption_mask)  # (B, embed)
        for layer in self.layers:
            tokens = layer(tokens, context, temb, self.rope_cos, self.rope_sin)
        out = self.norm_out(tokens, temb)  # (B, S, p*p*C)
        out = out.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, h, w)
