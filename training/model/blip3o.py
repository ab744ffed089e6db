"""`BLIP3o`: the backbone, the latent queries and the DiT of one variant, as one module.

The pixel decoder is a separate `Decoder` (it ships as its own diffusers folder). Parameter names
map one to one onto the published checkpoint (see `training/checkpoint.py`):
`qwen.model.visual.*` <- `visual.*`, `qwen.model.language_model.*` <- `model.{embed_tokens,
layers,norm}.*`, `qwen.lm_head` <- `lm_head`, `latent_queries` <- `model.latent_queries`,
`dit.*` <- `model.dit.model.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import ModelConfig
from training.model.backbone import build_qwen, query_conditioning
from training.model.dit import NextDiTCrossAttn


class BLIP3o(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.qwen = build_qwen(cfg.backbone)
        b = cfg.backbone
        self.latent_queries = nn.Parameter(torch.randn(1, b.n_query, b.hidden_size))
        self.dit = NextDiTCrossAttn(cfg.dit)

    def conditioning(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) prompt ids ending in `[IMG]` -> (B, 64, H) DiT conditioning."""
        return query_conditioning(self.qwen, self.latent_queries, input_ids)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Flow velocity: x (B, C, 8, 8), t (B,) = 1000 sigma, cond (B, 64, H)."""
        return self.dit(x, t, cond)

    @staticmethod
    def features_to_tokens(x: torch.Tensor) -> torch.Tensor:
        """DiT grid (B, C, h, w) -> row-major feature tokens (B, h*w, C)."""
        return x.flatten(2).transpose(1, 2)

    @staticmethod
    def tokens_to_features(tokens: torch.Tensor, side: int) -> torch.Tensor:
        """Feature tokens (B, side*side, C) -> DiT grid (B, C, side, side)."""
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, side, side)
