"""The `negative` build stage: the decoder's CFG negative is a built, hashed file of the folder,
made by the runtime's own loop over the model (blank_prompt) or zeros, as the config says."""

import dataclasses
import json

import numpy as np
import pytest

from export.build_plan import BuildRequest, build
from runtime.folder.manifest import UNVERIFIED, sha256_file
from runtime.generator import Generator
from training.config import from_preset
from training.random_weights import random_pipeline

pytestmark = pytest.mark.slow  # builds engine folders


def _build(out, mode, **kw):
    request = BuildRequest(
        variant="tiny", random_weights=True, out=out, graphs=("dit_step",), progress=False,
        decoder_negative=mode, **kw,
    )  # fmt: skip
    return build(request)


def _reference_negative(mode):
    cfg = from_preset("tiny")
    cfg = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, decoder_negative=mode))
    return random_pipeline(cfg, 0).negative_features().numpy()


def test_blank_prompt_negative_equals_the_reference_and_is_listed(tmp_path):
    folder = _build(tmp_path / "blank", "blank_prompt")
    m = json.loads((folder / "manifest.json").read_text())
    assert m["sampler"]["decoder_negative"] == "blank_prompt"
    entry = m["host"]["negative_features"]
    assert sha256_file(folder / entry["file"]) == entry["sha256"]
    assert entry in m["stages"]["negative"]["files"]
    ours = np.load(folder / entry["file"])
    ref = _reference_negative("blank_prompt")
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # a changed setting rebuilds that stage only; a rebuild back gives the same bytes
    zeros = _build(folder, "zeros")
    m2 = json.loads((zeros / "manifest.json").read_text())
    assert not np.load(zeros / m2["host"]["negative_features"]["file"]).any()
    assert m2["stages"]["export:dit_step"] == m["stages"]["export:dit_step"]
    _build(folder, "blank_prompt")
    assert sha256_file(folder / entry["file"]) == entry["sha256"]


def test_opening_a_folder_never_computes_or_writes_the_negative(tmp_path, monkeypatch):
    folder = _build(tmp_path / "z", None)  # tiny's own setting: zeros
    import runtime.jobs.generation as generation

    fail = lambda *a, **k: pytest.fail("the runtime sampled the negative")  # noqa: E731
    monkeypatch.setattr(generation, "blank_prompt_features", fail)
    assert (folder / UNVERIFIED).exists()  # the build changed files: the first open hashes them
    gen = Generator.from_dir(folder)
    assert not (folder / UNVERIFIED).exists()
    before = sorted(p.name for p in folder.iterdir())
    assert gen.manifest["sampler"]["decoder_negative"] == "zeros"
    negative = gen.folder.negative_features
    assert negative.shape == (1, 64, 32) and not negative.any()
    assert sorted(p.name for p in folder.iterdir()) == before
