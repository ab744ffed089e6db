"""benchmarks/soak.py: the leak soak runs, samples RSS and open files after warm-up, and judges
growth against its budget (the figures themselves are recorded in the README, not asserted);
benchmarks/soak_server.py: the server under mixed valid and hostile load leaks nothing."""

import json

import pytest

from benchmarks.soak import growth, main


def test_growth():
    assert growth([100, 100, 100]) == 0.0
    assert abs(growth([100, 104, 103]) - 0.04) < 1e-9
    assert growth([]) == 0.0


def test_soak_runs_and_reports(tiny_engine_dir, tmp_path, capsys):
    out = tmp_path / "soak.json"
    args = ["--engines", str(tiny_engine_dir), "--generations", "4", "--answers", "4"]
    args += ["--warmup", "1", "--every", "1", "--steps", "1", "--decoder-steps", "1", "-q"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["call"] for r in report["samples"]["generate"]] == [1, 2, 3, 4]
    assert all(r["rss"] > 0 and r["fds"] > 0 for r in report["samples"]["answer"])
    assert isinstance(report["flat"], bool) and "within 5%" in capsys.readouterr().out


@pytest.mark.slow
def test_the_server_soak_mixed_valid_and_hostile(tiny_engine_dir, tmp_path):
    """benchmarks/soak_server.py: many requests, valid and hostile in turn, from 4 clients:
    every answer the expected one (never a 5xx), RSS flat within 10% after warm-up, nothing
    left running, queued or open, the job table within its bound."""
    pytest.importorskip("fastapi")
    from benchmarks.soak_server import main as soak_server

    out = tmp_path / "soak-server.json"
    args = ["--engines", str(tiny_engine_dir), "--requests", "900", "--warmup", "180"]
    assert soak_server([*args, "--every", "60", "--out", str(out)]) == 0, out.read_text()
    report = json.loads(out.read_text())
    assert report["problems"] == [] and report["ready_after"] == 200
    assert report["left"]["open_jobs"] == report["left"]["running"] == 0
    assert report["flat"] and len(report["samples"]) >= 10
