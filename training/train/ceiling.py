"""How much of mini-GenEval a run's pixel decoder allows: its images from true target features.

Generation has two learned halves: the DiT makes target features from a prompt, the decoder (VAE +
UNet) paints features. `decoder_ceiling` takes the DiT out. For every mini-GenEval prompt and seed
it draws a scene that satisfies the prompt (`scene_for_prompt`), then judges with the benchmark's
own rules (a) the VAE's reconstruction of that scene and (b) the decoder's image from the scene's
true target features (the standardized tokens the DiT is trained to generate; no guidance, as the
decoder stage's own check). A pipeline scores above (b) only by luck, and (b) rarely above (a):
the gap between (b) and a checkpoint's mini-GenEval is what the DiT loses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from training.config import from_preset
from training.eval.geneval import (
    EVAL_SEEDS,
    TASKS,
    Record,
    check,
    make_prompts,
    scene_for_prompt,
    score,
)
from training.pipeline import to_pil
from training.train import encoders as enc
from training.train.common import Dist, images_tensor, mix_seed
from training.train.run import Run, load_decoder, load_target_encoder
from training.train.stages import DEFAULTS, KNOBS

log = logging.getLogger(__name__)


def _judge(prompts, images: torch.Tensor) -> dict[str, float]:
    """score() of (prompt, image in [0, 1]) pairs, without keeping the images."""
    records = [
        Record(p.task, p.prompt, 0, check(p.task, p.spec, np.asarray(to_pil(img))), None)
        for p, img in zip(prompts, images)
    ]
    return score(records)


@torch.no_grad()
def decoder_ceiling(
    run_dir: str | Path,
    *,
    per_task: int = 25,
    seeds: Sequence[int] = EVAL_SEEDS,
    decoder_steps: int | None = None,
    batch: int = 50,
) -> dict:
    """{"vae": scores, "decoder": scores} of a run folder with finished encoder and decoder.

    Scores are `geneval.score` dicts (six tasks + overall) over `per_task` prompts per task (the
    benchmark's prompt draw) x `seeds` oracle scenes. `decoder_steps` defaults to the sampler's.
    """
    if per_task < 1 or not seeds:
        raise ValueError(f"need per_task >= 1 and at least one seed, got {per_task}, {seeds!r}")
    cfg = from_preset("tiny")
    run = Run(
        out=Path(run_dir), cfg=cfg, seed=0, dist=Dist(), resume=False, settings=dict(DEFAULTS),
        knobs=dict(KNOBS),
    )  # fmt: skip
    encoder, stats = load_target_encoder(run)
    decoder = load_decoder(run)
    steps = cfg.sampler.decoder_steps if decoder_steps is None else decoder_steps
    prompts = [p for p in make_prompts(0, per_task) for _ in seeds]
    scenes = [
        scene_for_prompt(p.prompt, np.random.default_rng(mix_seed(seed, i)))
        for i, p in enumerate(make_prompts(0, per_task))
        for seed in seeds
    ]
    vae, painted = [], []
    for start in range(0, len(scenes), batch):
        images = images_tensor(scenes[start : start + batch])
        vae.append(decoder.decode_latents(enc.decoder_latents(decoder, images)))
        feats = enc.normalized_features(encoder, stats, images)
        painted.append(enc.reconstruct(decoder, feats, steps=steps, seed=start))
        log.info("decoder ceiling: %d/%d scenes", min(start + batch, len(scenes)), len(scenes))
    return {"vae": _judge(prompts, torch.cat(vae)), "decoder": _judge(prompts, torch.cat(painted))}


def to_table(result: dict) -> str:
    """Tasks as rows, the VAE and the decoder as columns."""
    lines = [f"{'task':<15} {'vae':>6} {'decoder':>8}"]
    for task in (*TASKS, "overall"):
        lines.append(f"{task:<15} {result['vae'][task]:>6.3f} {result['decoder'][task]:>8.3f}")
    return "\n".join(lines)
