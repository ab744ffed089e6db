"""Wrapper of the `vision` graph: the Qwen2.5-VL vision tower on host-prepared, window-ordered
patches (see `runtime.host.vision_feeds`).

transformers' tower computes its grid metadata with data-dependent shapes
(`get_vision_window_index` fails torch.export with GuardOnDataDependentSymNode) and splits its
attention by `cu_seqlens.tolist()`. This module re-implements only the orchestration of
`Qwen2_5_VisionTransformerPretrainedModel.forward` and the attention call; every weight and
every other computation is the tower's own submodule (patch_embed, norms, qkv/proj, MLPs,
merger). Segmented attention becomes one masked SDPA with the mask `seg[:, None] == seg[None, :]`
(full-attention blocks: per image/frame; other blocks: per window), which is exact at any grid.

Precision: RoPE, softmax and the RMSNorms run in fp32 whatever the weights' dtype (the norms do
so inside transformers' RMSNorm); the rotary frequencies are recomputed in fp32 in-graph, so an
fp16 export does not round the `inv_freq` buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionAttention,
    rotate_half,
)


class VisionGraph(nn.Module):
    """image_embeds = tower(window-ordered patches) gathered back to image order.

    Forward arguments are the `vision` spec's inputs (N patches, M = N / merge**2 tokens):
    pixel_values (N, patch_dim) float, rotary_pos_ids (N, 2) int64, full_segments (N,) int64,
    window_segments (N,) int64, reverse_index (M,) int64 -> image_embeds (M, out_hidden).
    """

    def __init__(self, visual: Qwen2_5_VisionTransformerPretrainedModel) -> None:
        super().__init__()
        self.visual = visual
        self.full_blocks = frozenset(visual.fullatt_block_indexes)
        self.merge_unit = visual.spatial_merge_unit

    def forward(self, pixel_values, rotary_pos_ids, full_segments, window_segments, reverse_index):
        v = self.visual
        x = v.patch_embed(pixel_values)  # (N, C)
        cos, sin = self._rotary(rotary_pos_ids)  # (N, head_dim) fp32 each
        full = full_segments[:, None] == full_segments[None, :]  # (N, N) bool
        window = window_segments[:, None] == window_segments[None, :]  # (N, N) bool
        for i, blk in enumerate(v.blocks):
            mask = full if i in self.full_blocks else window
            x = x + self._attention(blk.attn, blk.norm1(x), cos, sin, mask)  # (N, C)
            x = x + blk.mlp(blk.norm2(x))  # (N, C)
        merged = self._merge(x, reverse_index.shape[0])  # (M, out_hidden), window order
        return merged.index_select(0, reverse_index)  # (M, out_hidden), image order

    def _rotary(self, pos_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2_5_VLVisionRotaryEmbedding.forward with fp32 frequencies."""
        rope = self.visual.rotary_pos_emb
        inv_freq, scaling = rope.compute_axial_rope_parameters(rope.config)  # (head_dim / 4,)
        inv_freq = inv_freq.to(device=pos_ids.device, dtype=torch.float32)
        freqs = pos_ids[..., None].float() * inv_freq  # (N, 2, head_dim / 4)
        cos = rope.recomposition_frequencies(freqs.cos() * scaling)  # (N, head_dim)
        sin = rope.recomposition_frequencies(freqs.sin() * scaling)  # (N, head_dim)
        return cos, sin

    @staticmethod
    def _attention(
        attn: Qwen2_5_VLVisionAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Qwen2_5_VLVisionAttention.forward, a boolean mask in place of the cu_seqlens split."""
        n = x.shape[0]
        qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).float()
        q, k, v = qkv.unbind(0)  # (N, heads, head_dim) fp32 each
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (N, 1, head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        out = out[0].transpose(0, 1).reshape(n, -1).to(x.dtype)  # (N, C)
        return attn.proj(out)

    def _merge(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """Qwen2_5_VLPatchMerger.forward; the (N, C) -> (M, unit * C) regrouping is a gather of
        M * unit rows, so the graph's two dims need no divisibility guard between them."""
        merger = self.visual.merger
        rows = torch.arange(m * self.merge_unit, device=x.device)  # (M * unit,)
        x = merger.ln_q(x).index_select(0, rows)  # (M * unit, C)
        return merger.mlp(x.reshape(m, -1))  # (M, out_hidden)
