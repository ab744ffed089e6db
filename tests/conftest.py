"""Shared fixtures: seeded tiny components built once per test session."""

from __future__ import annotations

import pytest
import torch

from runtime.graphs import RUNTIME_GRAPHS


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


@pytest.fixture(scope="session")
def tiny_engine_dir(tmp_path_factory):
    """A tiny fp32 engine folder built once per test session, from the shipped trained checkpoint
    (checkpoints/tiny) when the repository has one, else from seeded random weights."""
    from export.plan import BuildRequest, build

    out = tmp_path_factory.mktemp("engines") / "tiny-fp32"
    return build(BuildRequest(variant="tiny", out=out, graphs=RUNTIME_GRAPHS, progress=False))


@pytest.fixture(scope="session")
def tiny_reference(tiny_engine_dir):
    """The PyTorch reference pipeline with the same weights as `tiny_engine_dir`."""
    from export.plan import random_pipeline
    from runtime.manifest import load_manifest
    from training.checkpoint import load_pipeline
    from training.config import from_dict

    manifest = load_manifest(tiny_engine_dir)
    if manifest["checkpoint"]["path"]:
        return load_pipeline(manifest["checkpoint"]["path"])
    return random_pipeline(from_dict(manifest["config"]), 0)
