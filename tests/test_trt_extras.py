"""The TensorRT extras: one CUDA major each (cuda-python 13 needs a CUDA 13 driver: a 12/13 pair
fails at the first cudaSetDevice), TensorRT 10.3 (JetPack 6) through 11.x admitted."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

EXTRAS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
    "project"
]["optional-dependencies"]


def _requirements(extra: str) -> dict[str, Requirement]:
    found = {}
    for text in EXTRAS[extra]:
        req = Requirement(text)
        if req.name == "blip3o-edge":
            for inner in req.extras:
                found.update(_requirements(inner))
        else:
            found[req.name] = req
    return found


@pytest.mark.parametrize(("extra", "major"), [("trt-cu12", 12), ("trt-cu13", 13), ("trt", 12)])
def test_each_trt_extra_holds_one_cuda_major(extra, major):
    reqs = _requirements(extra)
    cuda = reqs["cuda-python"].specifier
    assert f"{major}.0.0" in cuda and f"{major}.9.9" in cuda
    assert f"{major + 1}.0.0" not in cuda and f"{major - 1}.9.9" not in cuda
    trt = [r for name, r in reqs.items() if name.startswith("tensorrt")]
    assert [r.name for r in trt] == [f"tensorrt-cu{major}"]  # the meta package `tensorrt` is cu13
    newest = trt[0].specifier
    assert "11.4.0" in newest and "12.0.0" not in newest
    if major == 12:
        assert "10.3.0" in newest and "10.2.0" not in newest  # JetPack 6's TensorRT
    assert "ml_dtypes" in reqs
