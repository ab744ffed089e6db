"""benchmarks/soak.py: the leak soak runs, samples RSS and open files after warm-up, and judges
growth against its budget (the figures themselves are recorded in the README, not asserted)."""

import json

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
