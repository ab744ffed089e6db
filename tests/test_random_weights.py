"""Seeded random weights build at every variant's shapes, tokenizer included."""

import pytest

from training.config import reduced_depth
from training.random_weights import random_pipeline


@pytest.mark.slow  # builds a 1-layer 4b pipeline (~1 B parameters, ~20 s)
def test_random_weights_at_4b_shapes_have_the_configs_token_ids():
    """The runtime's prompt encoder refuses a tokenizer without the config's special ids; a
    random-weight 4b folder's blank-prompt negative ran through it and failed before the
    tokenizer was re-laid at Qwen's ids."""
    cfg = reduced_depth("4b", 1)
    pipe = random_pipeline(cfg, 0)
    vocab = pipe.tokenizer.get_vocab_size(with_added_tokens=True)
    b = cfg.backbone
    for name in ("img_token_id", "image_token_id", "eos_token_id", "vision_start_token_id"):
        assert getattr(b, name) < vocab, name
    assert pipe.tokenizer.id_to_token(b.img_token_id) == "[IMG]"
