"""benchmarks/reduced_depth.py end to end at tiny (the 4b run is recorded in the README)."""

import json

import pytest


@pytest.mark.slow
def test_reduced_depth_benchmark_fields(tmp_path):
    from benchmarks import reduced_depth

    out = tmp_path / "result.json"
    argv = ["--variant", "tiny", "--layers", "1", "--graphs", "dit_step", "--work", str(tmp_path)]
    assert reduced_depth.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["layers"] == 1 and set(result["stages"]) == {
        "assets",
        "negative",
        "export:dit_step",
    }
    stage = result["stages"]["export:dit_step"]
    assert stage["peak_bytes"] > 0 and stage["disk_bytes"] > 0 and stage["seconds"] > 0
    error = result["parity"]["dit_step"]["next_latents"]
    assert error["max_abs_error"] <= 1e-4 * max(1.0, error["scale"])
