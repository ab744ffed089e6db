"""The recipe: run a selection of the stages in order, alone, in two processes, or under torchrun.

`train` is what `python -m training train` calls. With `jobs=2` the understanding/generation chain
runs in a second process beside the target-encoder/decoder chain (generation polls for the
finished target encoder), one torch thread each. On 2 idle CPU cores the defaults take about
100 minutes this way: target encoder ~17 + VAE ~12 + UNet ~60 on one core, understanding ~42 +
stage 2 ~50 on the other (the two chains are balanced; checkpoints/tiny/MODEL_CARD.md has the
measured stage times).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from training.config import from_preset
from training.train.common import StageSettings, init_distributed
from training.train.run import Run, git_revision, record_run
from training.train.stages import CHAINS, DEFAULTS, KNOBS, STAGES, TRAINERS

log = logging.getLogger(__name__)


def parse_stages(text: str) -> list[str]:
    """`all` or a comma list of STAGES -> the selected stages in training order."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise ValueError(f"unknown stage(s) {unknown or text!r}; choose 'all' or from {STAGES}")
    return [s for s in STAGES if s in names]


def train(
    *,
    out: str | Path,
    stages: list[str],
    steps_scale: float = 1.0,
    resume: bool = False,
    seed: int = 0,
    settings: dict[str, StageSettings] | None = None,
    knobs: dict[str, dict] | None = None,
    stop_at: int | None = None,
    evals: bool = True,
    jobs: int = 1,
    wait_upstream_s: float = 0.0,
    stat_images: int = 512,
    command: str = "",
    force_gate: bool = False,
) -> dict:
    """Train the selected stages of the tiny model into `out`; returns per-stage results.

    `settings`/`knobs` override the defaults per loop (tests use tiny ones); `stop_at` ends every
    loop at that step (checkpointed, resumable); `jobs=2` trains the understanding/generation chain
    in a second process (CLI defaults only) beside the encoder/decoder chain, one torch thread
    each (two threads in one process thrash on 2 shared cores: a stage-2 step measured 0.9 s
    with one, 4-7 s with two); `command` is recorded in `run.json`; `force_gate` starts stage 2
    even on a failed caption-reading gate.
    """
    d = init_distributed()
    base = {**DEFAULTS, **(settings or {})}
    run = Run(
        out=Path(out), cfg=from_preset("tiny"), seed=seed, dist=d, resume=resume,
        settings={k: v.scaled(steps_scale) for k, v in base.items()},
        knobs={k: {**v, **(knobs or {}).get(k, {})} for k, v in KNOBS.items()}, stop_at=stop_at,
        evals=evals, wait_upstream_s=wait_upstream_s, stat_images=stat_images,
        force_gate=force_gate,
    )  # fmt: skip
    child = None
    if jobs not in (1, 2):
        raise ValueError(f"jobs must be 1 or 2, got {jobs}")
    if jobs == 2 and d.world > 1:
        raise ValueError("--jobs 2 cannot be combined with torchrun; use one or the other")
    second = [s for s in stages if s in CHAINS[1]]
    if jobs == 2 and second and len(second) < len(stages):
        if settings or knobs or stop_at is not None:
            raise ValueError("jobs=2 runs the CLI's default settings; drop the overrides")
        child = _spawn_chain(run, second, steps_scale, command)
        stages = [s for s in stages if s not in second]
    results, revision = {}, git_revision()
    for stage in stages:
        t0 = time.time()
        loops = TRAINERS[stage](run)
        results[stage] = {"loops": loops, "wall_seconds": time.time() - t0}
        if d.main:
            log.info("stage %s finished in %.0f s", stage, results[stage]["wall_seconds"])
            record_run(run, {stage: results[stage]}, steps_scale, command, revision)
    if child is not None and child.wait() != 0:
        raise RuntimeError(f"the {'+'.join(second)} process failed (exit {child.returncode})")
    return results


def _spawn_chain(run: Run, stages: list[str], steps_scale: float, command: str):
    args = [
        sys.executable, "-m", "training", "train", "--stages", ",".join(stages),
        "--out", str(run.out), "--steps-scale", repr(steps_scale), "--seed", str(run.seed),
        "--threads", str(torch.get_num_threads()), "--wait-upstream", "7200",
        "--recorded-command", command,
    ]  # fmt: skip
    args += ["--resume"] if run.resume else []
    args += [] if run.evals else ["--no-eval"]
    args += ["--force-gate"] if run.force_gate else []
    log.info("training %s in a second process", ",".join(stages))
    return subprocess.Popen(args, env={**os.environ, "WORLD_SIZE": "1"})
