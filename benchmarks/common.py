"""What every benchmark shares: where results go, the thread count, and the optional chart.

Results are written where `--out` says. Without it they go to `benchmarks/out/` (git-ignored),
never to `benchmarks/results/`: those files are the committed measurements the READMEs quote, and
a run rewrites one only when `--out` names it. Every comparison runs both sides at the same
settings; the thread count, the one setting a busy machine punishes most, defaults to 1
everywhere (on a 2-core box shared with other jobs, torch's default threads ran the tiny UNet
100x slower than one thread) and is recorded in each JSON. The table is printed before any
chart, and matplotlib is imported only to draw one: without it the table and JSON still come
out, and one line says the chart was skipped and how to get it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "benchmarks" / "out"  # default output, git-ignored
RESULTS = REPO / "benchmarks" / "results"  # committed; written only when --out names it
DEFAULT_THREADS = 1
INSTALL_MATPLOTLIB = "pip install matplotlib (the dev extra has it)"


def scratch(name: str) -> Path:
    """The default output path `benchmarks/out/<name>` (read at call time: tests redirect it)."""
    return SCRATCH / name


def threads_count(text: str) -> int:
    """argparse type of `--threads`: one count >= 1, used by every side of a comparison."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a thread count >= 1 (each library's own default differs, and a "
            "comparison needs the same count on both sides)"
        )
    return value


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def save_chart(draw: Callable[[Path], None], path: Path) -> Path | None:
    """`draw(path)` with matplotlib on the Agg backend, then one line saying where; without
    matplotlib, one line saying the chart was skipped and how to get it, and None."""
    try:
        import matplotlib
    except ImportError:
        print(f"chart skipped ({path.name}): matplotlib is not installed; {INSTALL_MATPLOTLIB}")
        return None
    matplotlib.use("Agg")
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(path)
    print(f"wrote {path}")
    return path
