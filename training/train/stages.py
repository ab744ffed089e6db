"""The four training stages in BLIP3-o's order, each a resumable loop writing `<run>/<stage>.pt`.

    target_encoder -> decoder (vae, then unet) -> understanding -> generation

A later stage loads the finished weights of the earlier ones from the same run folder (the
decoder and generation stages need the target encoder's features; generation needs the stage-1
backbone). `training.train.recipe.train` runs a selection of them (`python -m training train`).
"""

from __future__ import annotations

import logging

import torch

from training.data.shapes import format_caption, sample_spec
from training.flow import flow_matching_loss
from training.model.blip3o import BLIP3o
from training.model.decoder import Decoder
from training.model.target_encoder import TargetEncoder
from training.train import encoders as enc
from training.train.backbone import (
    GenerationObjective,
    Stage1Objective,
    UnderstandingBatcher,
    caption_batch,
    conditioning,
    generation_prompt_batch,
)
from training.train.common import (
    Loop,
    StageSettings,
    images_tensor,
    step_generator,
    step_rng,
)
from training.train.gate import format_gate, gate_run
from training.train.run import (
    LOOP_INDEX,
    Run,
    decoder_ready,
    held_out_scenes,
    load_decoder,
    load_model,
    load_target_encoder,
)
from training.train.state import load_state, save_state

log = logging.getLogger(__name__)

STAGES = ("target_encoder", "decoder", "understanding", "generation")
# Two independent chains: with --jobs 2 they train concurrently (generation waits for the encoder).
CHAINS = (("target_encoder", "decoder"), ("understanding", "generation"))
# Loops and their default settings (scaled by --steps-scale), with --jobs 2 on 2 CPU cores:
# target encoder -> VAE -> UNet on one core, understanding -> generation on the other (generation,
# the longest and most step-hungry loop, takes both cores once the UNet is done). The DiT and the
# UNet keep an EMA of their weights (what the checkpoint ships).
DEFAULTS = {
    "target_encoder": StageSettings(steps=1600, batch=64, lr=2e-3, warmup=50, eval_every=400),
    "decoder_vae": StageSettings(steps=1600, batch=16, lr=2e-3, warmup=40, eval_every=400),
    "decoder_unet": StageSettings(
        steps=8000, batch=32, lr=2e-3, warmup=100, eval_every=2000, ema=0.999
    ),
    "understanding": StageSettings(steps=2400, batch=32, lr=1e-3, warmup=100, eval_every=600),
    "generation": StageSettings(
        steps=2000, batch=32, lr=1e-3, warmup=100, eval_every=1000, ema=0.999
    ),
}
# Stage-specific knobs (part of each loop's fingerprint).
KNOBS = {
    "decoder_vae": {"crop": 32, "kl_weight": 1e-6},
    "decoder_unet": {"p_uncond": 0.1, "feature_noise": 0.1, "repeats": 2, "min_snr_gamma": 5.0},
    "understanding": {
        "caption_rows": 16,
        "caption_lm_weight": 1.0,
        "caption_read_weight": 1.0,
        "query_init_std": 0.02,
        "turns": 4,
    },
    "generation": {"repeats": 2, "timesteps": "uniform"},
}


# ---------------------------------------------------------------- stages


def train_target_encoder(run: Run) -> dict:
    name = "target_encoder"
    torch.manual_seed(run.seed)
    encoder = TargetEncoder(run.cfg.target_encoder)
    enc.init_target_encoder(encoder)
    objective = enc.ClipObjective(encoder, run.cfg.backbone.vocab_size)
    end_id = run.cfg.backbone.pad_token_id

    def batch(step: int) -> dict:
        scenes = run.scenes(name, step)
        ids, lengths = enc.caption_ids(run.tokenizer, [s.caption for s in scenes], end_id)
        return {"images": images_tensor(scenes), "ids": ids, "lengths": lengths}

    held = held_out_scenes(128)
    held_ids = enc.caption_ids(run.tokenizer, [s.caption for s in held], end_id)
    held_images = images_tensor(held)
    loop = Loop(
        name, run.path(name), objective, {"objective": objective}, batch, run.settings[name],
        run.fingerprint(name), lambda: enc.retrieval_accuracy(objective, held_images, *held_ids),
    )  # fmt: skip
    result = run.run(loop)
    if result["done"] and "feature_stats" not in loop.extra:
        images = images_tensor(run.scenes(name, 10**6, run.stat_images, shared=True))
        stats = enc.feature_stats(encoder, images)
        loop.extra["feature_stats"] = {k: v.tolist() for k, v in stats.items()}
        _resave_extra(run, name, loop.extra)
    return {name: result}


def _resave_extra(run: Run, name: str, extra: dict) -> None:
    if run.dist.main:
        state = load_state(run.path(name))
        state["extra"] = extra
        save_state(run.path(name), state)


def train_decoder(run: Run) -> dict:
    encoder, stats = load_target_encoder(run)
    torch.manual_seed(run.seed)
    decoder = Decoder(run.cfg.decoder)
    held = images_tensor(held_out_scenes(32))
    held_feats = enc.normalized_features(encoder, stats, held)

    # phase 1: the VAE
    name, knobs = "decoder_vae", run.knobs["decoder_vae"]
    decoder.unet.requires_grad_(False)
    vae_objective = enc.VaeObjective(decoder, knobs["kl_weight"])

    def vae_batch(step: int) -> dict:
        images = images_tensor(run.scenes(name, step))
        crops = enc.random_crops(images, knobs["crop"], step_rng(run.seed, 2, step, run.dist.rank))
        return {"images": crops, "generator": run.generator(name, step)}

    @torch.no_grad()
    def vae_eval() -> dict:
        recon = decoder.decode_latents(enc.decoder_latents(decoder, held))
        mse = float(((recon - held) ** 2).mean())
        return {"mse": mse, "match": enc.detection_match(recon, held)}

    loop = Loop(
        name, run.path(name), vae_objective, {"decoder": decoder}, vae_batch,
        run.settings[name], run.fingerprint(name), vae_eval,
    )  # fmt: skip
    vae_result = run.run(loop)
    if not vae_result["done"]:
        return {name: vae_result}
    if "latent_stats" not in loop.extra:
        stat_images = images_tensor(run.scenes(name, 10**6, run.stat_images, shared=True))
        loop.extra["latent_stats"] = enc.standardize_latents(decoder, stat_images)
        _resave_extra(run, name, {**loop.extra, "standardized": decoder.state_dict()})
    else:  # resumed after standardizing: take the standardized weights
        decoder.load_state_dict(loop.extra["standardized"])

    # phase 2: the UNet on the frozen, standardized VAE
    name, knobs = "decoder_unet", run.knobs["decoder_unet"]
    decoder.vae.requires_grad_(False)
    decoder.unet.requires_grad_(True)
    objective = enc.UnetObjective(
        decoder, enc.ddpm_scheduler(run.cfg), knobs["p_uncond"], knobs["min_snr_gamma"]
    )
    repeats = knobs["repeats"]
    if run.settings[name].batch % repeats:
        raise ValueError(f"decoder_unet batch {run.settings[name].batch} is not a multiple of "
                         f"its repeats {repeats}")  # fmt: skip

    def unet_batch(step: int) -> dict:
        g = run.generator(name, step)
        scenes = run.scenes(name, step, run.settings[name].batch // repeats)
        return enc.unet_batch(decoder, encoder, stats, scenes, knobs["feature_noise"], g, repeats)

    def unet_eval() -> dict:
        recon = enc.reconstruct(decoder, held_feats[:16], steps=25, seed=run.seed)
        return {"match": enc.detection_match(recon, held[:16])}

    loop = Loop(
        name, run.path(name), objective, {"decoder": decoder}, unet_batch, run.settings[name],
        run.fingerprint(name), unet_eval,
    )  # fmt: skip
    return {"decoder_vae": vae_result, name: run.run(loop)}


def train_understanding(run: Run) -> dict:
    from training.eval.understanding import exact_match, make_questions
    from training.pipeline import ReferencePipeline

    name, knobs = "understanding", run.knobs["understanding"]
    torch.manual_seed(run.seed)
    model = BLIP3o(run.cfg)
    model.dit.requires_grad_(False)
    init_queries(run, model)
    objective = Stage1Objective(model, knobs["caption_lm_weight"], knobs["caption_read_weight"])
    batcher = UnderstandingBatcher(run.cfg, run.tokenizer, knobs["turns"])

    def batch(step: int) -> dict:
        chats = batcher(run.scenes(name, step), step_rng(run.seed, 4, step, run.dist.rank))
        rng = step_rng(run.seed, 40, step, run.dist.rank)
        captions = [format_caption(sample_spec(rng)) for _ in range(knobs["caption_rows"])]
        return {**chats, **caption_batch(run.tokenizer, run.cfg, captions)} if captions else chats

    items = make_questions(seed=1, n=48)

    def evaluate() -> dict:
        pipe = ReferencePipeline(model, Decoder(run.cfg.decoder), run.tokenizer)
        result = exact_match(lambda image, q: pipe.answer(image, q, max_new_tokens=24), items)
        return {"exact_match": result["accuracy"], **result["by_type"]}

    modules = {"qwen": model.qwen, "reading": objective.reader}
    loop = Loop(
        name, run.path(name), objective, modules, batch, run.settings[name],
        run.fingerprint(name), evaluate,
    )  # fmt: skip
    return {name: run.run(loop)}


def init_queries(run: Run, model: BLIP3o) -> None:
    """The latent queries' start: N(0, std) at the token embeddings' scale (N(0, 1) ones would
    swamp what the LM's attention brings in from the prompt)."""
    with torch.no_grad():
        g = step_generator(run.seed, LOOP_INDEX["generation"], 10**9, 0)
        shape = model.latent_queries.shape
        std = run.knobs["understanding"]["query_init_std"]
        model.latent_queries.copy_(torch.randn(shape, generator=g) * std)


def train_generation(run: Run) -> dict:
    name, knobs = "generation", run.knobs["generation"]
    encoder, stats = load_target_encoder(run)
    model = load_model(run, generation=False)  # stage 1's backbone and queries
    model.qwen.requires_grad_(False)
    if run.dist.main and not run.path(name).exists():  # before stage 2's first step
        report = gate_run(model, run.tokenizer, run.out, force=run.force_gate)
        log.info("caption-reading gate:\n%s", format_gate(report))
    objective = GenerationObjective(model, knobs["repeats"], knobs["timesteps"])

    def batch(step: int) -> dict:
        scenes = run.scenes(name, step)
        feats = enc.normalized_features(encoder, stats, images_tensor(scenes))  # (P, 64, C)
        prompts = generation_prompt_batch(run.tokenizer, run.cfg, [s.caption for s in scenes])
        targets = feats.repeat_interleave(knobs["repeats"], dim=0)  # (P*r, 64, C)
        return {**prompts, "targets": targets, "generator": run.generator(name, step)}

    held = held_out_scenes(32, seed=5)
    held_targets = enc.normalized_features(encoder, stats, images_tensor(held))
    held_prompts = generation_prompt_batch(run.tokenizer, run.cfg, [h.caption for h in held])
    decoder = None

    @torch.no_grad()
    def evaluate() -> dict:
        nonlocal decoder
        from training.pipeline import ReferencePipeline
        from training.train.evaluate import geneval

        cond = conditioning(model, held_prompts["input_ids"], held_prompts["prompt_mask"])
        x0 = BLIP3o.tokens_to_features(held_targets, run.cfg.dit.input_size)
        g = step_generator(run.seed, 99, 0, 0)
        loss = flow_matching_loss(model.velocity, x0, cond, p_uncond=0.0, generator=g)
        result = {"held_out_loss": float(loss)}
        if decoder is None and decoder_ready(run):
            decoder = load_decoder(run)
        if decoder is not None:  # trained concurrently with --jobs 2: may not be ready yet
            pipe = ReferencePipeline(model, decoder, run.tokenizer)
            scores = geneval(pipe, per_task=2, seeds=(0,))
            result.update({k: v for k, v in scores.items() if k != "records"})
        return result

    modules = {"model": model}
    loop = Loop(
        name, run.path(name), objective, modules, batch, run.settings[name],
        run.fingerprint(name), evaluate,
    )  # fmt: skip
    return {name: run.run(loop)}


TRAINERS = {
    "target_encoder": train_target_encoder,
    "decoder": train_decoder,
    "understanding": train_understanding,
    "generation": train_generation,
}
