"""The plain graph dimensions of a model config (the bridge from `training` to
`runtime.folder.graphs`)."""

from __future__ import annotations

from runtime.folder.graphs import GraphDims
from training.config import ModelConfig

# Longest prefill / KV cache the profiles allow, per variant size class.
_MAX_PROMPT = {"tiny": 512, "4b": 2048, "8b": 2048}
_MAX_SEQ = {"tiny": 640, "4b": 4096, "8b": 4096}


def graph_dims(cfg: ModelConfig) -> GraphDims:
    b, v, dec = cfg.backbone, cfg.backbone.vision, cfg.decoder
    patch_pixels = v.patch_size**2
    unit = v.spatial_merge_size**2
    # patches of the smallest / a typical / the largest image the preprocessing admits
    min_patches = max(unit, (v.min_pixels // patch_pixels) // unit * unit)
    max_patches = (v.max_pixels // patch_pixels) // unit * unit
    opt_side = max(v.patch_size * v.spatial_merge_size, min(448, cfg.image_size))
    opt_patches = min(max_patches, max(min_patches, (opt_side // v.patch_size) ** 2))
    return GraphDims(
        hidden=b.hidden_size,
        num_layers=b.num_layers,
        num_kv_heads=b.num_kv_heads,
        head_dim=b.head_dim,
        vocab_size=b.vocab_size,
        patch_dim=3 * v.temporal_patch_size * patch_pixels,
        merge_unit=unit,
        min_patches=min_patches,
        max_patches=max_patches,
        opt_patches=opt_patches,
        n_query=b.n_query,
        feature_width=cfg.feature_width,
        feature_side=cfg.dit.input_size,
        latent_channels=dec.latent_channels,
        latent_size=dec.latent_size,
        image_size=dec.image_size,
        max_prompt=_MAX_PROMPT[cfg.variant],
        max_seq=_MAX_SEQ[cfg.variant],
    )
