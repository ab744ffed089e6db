"""Shared fixtures: seeded tiny components built once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_config():
    from training.config import from_preset

    return from_preset("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from training.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_config, tiny_tokenizer):
    """A random-weight tiny reference pipeline (seeded)."""
    from training.model.blip3o import BLIP3o
    from training.model.decoder import Decoder
    from training.pipeline import ReferencePipeline

    torch.manual_seed(0)
    return ReferencePipeline(BLIP3o(tiny_config), Decoder(tiny_config.decoder), tiny_tokenizer)
