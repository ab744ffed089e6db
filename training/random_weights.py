"""Seeded random weights: the whole reference pipeline at a config's true shapes, untrained.

For latency and memory work at 4b/8b shapes without the published checkpoint, and for tests: an
engine folder built so is labelled `random-weights-seed-N` in its manifest, and the same seed
rebuilds the same weights (the torch backend does, to run the folder's reference).
"""

from __future__ import annotations

import torch

from training.config import ModelConfig
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.pipeline import ReferencePipeline
from training.tokenizer import build_tiny_tokenizer


def random_pipeline(cfg: ModelConfig, seed: int) -> ReferencePipeline:
    """Seeded random weights (labelled as such in the manifest). Seeds torch's global RNG.

    The tokenizer is the tiny one; at 4b/8b shapes it is re-laid at Qwen2.5's ids
    (`qwen_shaped_tokenizer`), so the config's special-token ids (`[IMG]` 151665, ...) exist in
    it, as they do in the published checkpoint's."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    if cfg.backbone.img_token_id >= tokenizer.get_vocab_size(with_added_tokens=True):
        from training.published import qwen_shaped_tokenizer

        tokenizer = qwen_shaped_tokenizer(tokenizer)
    return ReferencePipeline(BLIP3o(cfg), Decoder(cfg.decoder), tokenizer)
