"""Shared fixtures: seeded tiny components built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.folder.graphs import RUNTIME_GRAPHS


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
    import torch

    from training.model.blip3o import BLIP3o
    from training.model.decoder import Decoder
    from training.pipeline import ReferencePipeline

    torch.manual_seed(0)
    return ReferencePipeline(BLIP3o(tiny_config), Decoder(tiny_config.decoder), tiny_tokenizer)


# The build is content-keyed (checkpoint, exporter source, tool versions), so a folder kept
# between test runs is rebuilt exactly when something it depends on changed: the inner loop
# (`pytest -m "not slow"`) pays the ~90 s export once, not every run.
TEST_ENGINES = Path(__file__).resolve().parents[1] / "engines" / ".test-cache"


@pytest.fixture(scope="session")
def tiny_engine_dir():
    """A tiny fp32 engine folder from the shipped trained checkpoint (checkpoints/tiny), built
    by the real exporter into engines/.test-cache/ (up to date: nothing to do). Tests that
    change a folder work on a copy."""
    from export.build_plan import BuildRequest, build

    out = TEST_ENGINES / "tiny-fp32"
    return build(BuildRequest(variant="tiny", out=out, graphs=RUNTIME_GRAPHS, progress=False))


@pytest.fixture(scope="session")
def tiny_reference(tiny_engine_dir):
    """The PyTorch reference pipeline with the same weights as `tiny_engine_dir`."""
    from runtime.folder.manifest import load_manifest
    from training.checkpoint import load_pipeline
    from training.config import from_dict
    from training.random_weights import random_pipeline

    manifest = load_manifest(tiny_engine_dir)
    if manifest["checkpoint"]["path"]:
        return load_pipeline(manifest["checkpoint"]["path"])
    return random_pipeline(from_dict(manifest["config"]), 0)


# The fast tier exports nothing: a test that needs a real engine folder (or the reference over
# its weights) is slow, whatever file it lives in. Control flow is tested in the fast tier over
# scripted sessions (tests/fake_sessions.py).
EXPORTING_FIXTURES = {"tiny_engine_dir", "tiny_reference"}


def pytest_collection_modifyitems(items):
    for item in items:
        if EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
