"""Evaluation of a pipeline: mini-GenEval and understanding exact-match, plus the report files.

`batched_generate` produces exactly what `ReferencePipeline.generate(prompt, seed)` does (same
host noise per seed, same conditioning, same negative, same samplers) but runs many (prompt, seed)
pairs per DiT/UNet call, which is what makes 600 evaluation images affordable on a CPU. Sampler
settings come from the checkpoint's `SamplerConfig`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from training.eval.geneval import EVAL_SEEDS, TASKS, evaluate, make_prompts, save_grid, to_table
from training.eval.understanding import exact_match, make_questions
from training.flow import host_noise
from training.pipeline import ReferencePipeline, to_pil

log = logging.getLogger(__name__)


@torch.no_grad()
def batched_generate(
    pipe: ReferencePipeline,
    requests: Sequence[tuple[str, int]],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    decoder_steps: int | None = None,
    decoder_guidance: float | None = None,
    batch: int = 48,
) -> dict[tuple[str, int], np.ndarray]:
    """(prompt, seed) -> (64, 64, 3) uint8 image, as `pipe.generate(prompt, seed)` would give."""
    s = pipe.config.sampler
    steps = s.steps if steps is None else steps
    guidance = s.guidance if guidance is None else guidance
    decoder_steps = s.decoder_steps if decoder_steps is None else decoder_steps
    decoder_guidance = s.decoder_guidance if decoder_guidance is None else decoder_guidance
    todo = list(dict.fromkeys(requests))
    conds: dict[str, torch.Tensor] = {}
    images: dict[tuple[str, int], np.ndarray] = {}
    negative = pipe.negative_features()
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        noise, latent = [], []
        for prompt, seed in chunk:
            if prompt not in conds:
                conds[prompt] = pipe.conditioning(prompt)  # (1, 64, H)
            n, lat = host_noise(seed, pipe._feature_shape(1), pipe._latent_shape(1))
            noise.append(n)
            latent.append(lat)
        cond = torch.cat([conds[p] for p, _ in chunk])  # (N, 64, H)
        tokens = pipe.sample_tokens(cond, torch.cat(noise), steps=steps, guidance=guidance)
        pixels = pipe.decoder.sample(
            tokens, negative, torch.cat(latent).to(pipe.device), steps=decoder_steps,
            guidance=decoder_guidance,
        )  # fmt: skip
        for key, px in zip(chunk, pixels):
            images[key] = np.asarray(to_pil(px))
    return images


def geneval(
    pipe: ReferencePipeline,
    *,
    per_task: int = 25,
    seeds: Sequence[int] = EVAL_SEEDS,
    prompt_seed: int = 0,
    **sampler,
) -> dict:
    """mini-GenEval of a pipeline: per-task scores, `overall` and the judged `records`."""
    prompts = make_prompts(prompt_seed, per_task)
    requests = [(p.prompt, seed) for p in prompts for seed in seeds]
    images = batched_generate(pipe, requests, **sampler)
    return evaluate(lambda prompt, seed: images[prompt, seed], prompts, seeds)


def understanding(pipe: ReferencePipeline, *, n: int = 200, seed: int = 0) -> dict:
    """Exact-match accuracy of `pipe.answer` on n held-out questions."""
    items = make_questions(seed, n)
    return exact_match(lambda image, q: pipe.answer(image, q, max_new_tokens=32), items)


def grid_records(records, per_task: int = 8) -> list:
    """Seed-0 records of the first `per_task` distinct prompts of each task, for the PNG."""
    chosen = []
    for task in TASKS:
        prompts: set[str] = set()
        for r in records:
            fresh = r.prompt not in prompts and len(prompts) < per_task
            if r.task == task and r.seed == 0 and fresh:
                prompts.add(r.prompt)
                chosen.append(r)
    return chosen


def evaluate_pipeline(
    pipe: ReferencePipeline,
    out: str | Path,
    *,
    per_task: int = 25,
    questions: int = 200,
    label: str = "",
    **sampler,
) -> dict:
    """Run both evaluations; write `eval.json`, `geneval.txt` and `geneval_grid.png` to `out`.

    `sampler` overrides the checkpoint's sampler settings (steps, guidance, decoder_steps,
    decoder_guidance); unset ones come from its `SamplerConfig`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    gen = geneval(pipe, per_task=per_task, **sampler)
    t1 = time.time()
    und = understanding(pipe, n=questions)
    t2 = time.time()
    table = to_table(gen)
    save_grid(grid_records(gen["records"]), out / "geneval_grid.png")
    report = {
        "checkpoint": label,
        "sampler": {
            k: sampler.get(k) if sampler.get(k) is not None else getattr(pipe.config.sampler, k)
            for k in ("steps", "guidance", "decoder_steps", "decoder_guidance")
        },
        "geneval": {k: v for k, v in gen.items() if k != "records"},
        "geneval_images": len(gen["records"]),
        "geneval_per_task_prompts": per_task,
        "understanding": und,
        "seconds": {"geneval": round(t1 - t0, 1), "understanding": round(t2 - t1, 1)},
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "geneval.txt").write_text(table + "\n")
    return report


def format_report(report: dict) -> str:
    """The mini-GenEval table and the understanding line, as printed by the CLI."""
    gen = report["geneval"]
    und = report["understanding"]
    lines = [f"{'task':<14} {'score':>6}"]
    lines += [f"{t:<14} {gen[t]:>6.3f}" for t in TASKS]
    lines.append(f"{'overall':<14} {gen['overall']:>6.3f}")
    by_type = ", ".join(f"{k} {v:.3f}" for k, v in und["by_type"].items())
    lines.append(f"understanding exact-match {und['accuracy']:.3f} ({und['correct']}/{und['n']}; "
                 f"{by_type})")  # fmt: skip
    return "\n".join(lines)
