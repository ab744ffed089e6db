"""How much of mini-GenEval a run's pixel decoder allows: its images from true target features.

Generation has two learned halves: the DiT makes target features from a prompt, the decoder (VAE +
UNet) paints features. `decoder_ceiling` takes the DiT out. For every mini-GenEval prompt and seed
it draws a scene that satisfies the prompt (`scene_for_prompt`), then judges with the benchmark's
own rules (a) the VAE's reconstruction of that scene and (b) the decoder's image from the scene's
true target features (the standardized tokens the DiT is trained to generate), with the sampler's
decoder steps and guidance against the zero negative the UNet was trained to drop to. A pipeline
scores above (b) only by luck, and (b) rarely above (a): the gap between (b) and a checkpoint's
mini-GenEval is what the DiT loses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.eval.geneval import EVAL_SEEDS, TASKS, evaluate, make_prompts, scene_for_prompt
from training.pipeline import to_pil
from training.train import encoders as enc
from training.train.common import images_tensor, mix_seed
from training.train.publish import open_run
from training.train.run import load_decoder, load_target_encoder


def judge(prompts, seeds: Sequence[int], images: dict) -> dict[str, float]:
    """`geneval.evaluate` scores of {(prompt, seed): image in [0, 1]}, without the records."""
    result = evaluate(lambda prompt, seed: np.asarray(to_pil(images[prompt, seed])), prompts, seeds)
    return {k: v for k, v in result.items() if k != "records"}


@torch.no_grad()
def decoder_ceiling(
    run_dir: str | Path,
    *,
    per_task: int = 25,
    seeds: Sequence[int] = EVAL_SEEDS,
    decoder_steps: int | None = None,
    decoder_guidance: float | None = None,
    batch: int = 50,
) -> dict:
    """{"vae": scores, "decoder": scores} of a run folder with finished encoder and decoder.

    Scores are `geneval.score` dicts (six tasks + overall) over the benchmark's `per_task`
    prompts per task x `seeds`, one oracle scene per distinct (prompt, seed) as the benchmark
    makes one image. `decoder_steps` and `decoder_guidance` default to the sampler's.
    """
    if per_task < 1 or not seeds:
        raise ValueError(f"need per_task >= 1 and at least one seed, got {per_task}, {seeds!r}")
    run = open_run(run_dir)
    encoder, stats = load_target_encoder(run)
    decoder = load_decoder(run)
    s = run.cfg.sampler
    steps = s.decoder_steps if decoder_steps is None else decoder_steps
    guidance = s.decoder_guidance if decoder_guidance is None else decoder_guidance
    prompts = make_prompts(0, per_task)
    keys = list(dict.fromkeys((p.prompt, seed) for p in prompts for seed in seeds))
    vae, painted = {}, {}
    for start in tqdm(range(0, len(keys), batch), desc="decoder ceiling", unit="batch"):
        chunk = keys[start : start + batch]
        scenes = [
            scene_for_prompt(prompt, np.random.default_rng(mix_seed(seed, start + i)))
            for i, (prompt, seed) in enumerate(chunk)
        ]
        images = images_tensor(scenes)
        vae.update(zip(chunk, decoder.decode_latents(enc.decoder_latents(decoder, images))))
        feats = enc.normalized_features(encoder, stats, images)
        painted.update(
            zip(chunk, enc.reconstruct(decoder, feats, steps=steps, seed=start, guidance=guidance))
        )
    return {
        "vae": judge(prompts, seeds, vae),
        "decoder": judge(prompts, seeds, painted),
        "decoder_steps": steps,
        "decoder_guidance": guidance,
    }


def to_table(result: dict) -> str:
    """Tasks as rows, the VAE and the decoder as columns."""
    lines = [f"decoder: {result['decoder_steps']} steps, guidance {result['decoder_guidance']} "
             "against the zero negative", f"{'task':<15} {'vae':>6} {'decoder':>8}"]  # fmt: skip
    for task in (*TASKS, "overall"):
        lines.append(f"{task:<15} {result['vae'][task]:>6.3f} {result['decoder'][task]:>8.3f}")
    return "\n".join(lines)
