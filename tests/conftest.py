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


from runtime.graphs import RUNTIME_GRAPHS  # noqa: E402


@pytest.fixture(scope="session")
def tiny_engine_dir(tmp_path_factory):
    """A tiny fp32 engine folder (seeded random weights), built once per test session."""
    from export.plan import BuildRequest, build

    out = tmp_path_factory.mktemp("engines") / "tiny-fp32"
    return build(BuildRequest(variant="tiny", out=out, graphs=RUNTIME_GRAPHS, progress=False))


@pytest.fixture(scope="session")
def tiny_reference(tiny_engine_dir):
    """The PyTorch reference pipeline with the same seeded weights as `tiny_engine_dir`."""
    from export.plan import random_pipeline
    from training.config import from_preset

    return random_pipeline(from_preset("tiny"), 0)
