"""The target encoder: an EVA-CLIP-style ViT whose pooled patch tokens the DiT learns to generate.

BLIP3-o's targets are the raw last-block tokens of EVA-CLIP-E-14-plus (class token dropped),
a 32x32 grid at 448 px, average-pooled 4x4 (`early_pool2d_4`) to 8x8 = 64 tokens of width 1792.
We build the ViT with transformers' CLIP vision tower (same pre-LN ViT family; the tiny model is
trained contrastively as a CLIP) and keep the pooling as a named option. Training only: inference
never runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from training.config import TargetEncoderConfig


def vision_config(cfg: TargetEncoderConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",
    )


def pool_tokens(tokens: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """Average-pool a row-major (B, grid*grid, W) token grid by factor x factor: (B, n*n, W)."""
    b, n, w = tokens.shape
    if n != grid * grid or grid % factor:
        raise ValueError(f"cannot pool {n} tokens as a {grid}x{grid} grid by {factor}")
    x = tokens.transpose(1, 2).reshape(b, w, grid, grid)  # (B, W, g, g)
    x = F.avg_pool2d(x, factor)  # (B, W, g/f, g/f)
    return x.flatten(2).transpose(1, 2)  # (B, (g/f)^2, W)


class TargetEncoder(nn.Module):
    """Images (B, 3, S, S), CLIP-normalized, to pooled features (B, 64, W)."""

    def __init__(self, cfg: TargetEncoderConfig, vit: CLIPVisionModel | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.vit = vit if vit is not None else CLIPVisionModel(vision_config(cfg))
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, S, S) to the encoder's input normalization."""
        return (images - self.mean) / self.std

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(pixel_values=pixel_values).last_hidden_state[:, 1:]  # (B, g*g, W)
        return pool_tokens(tokens, self.config.grid, self.config.pool_factor)  # (B, 64, W)
