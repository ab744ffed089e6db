"""Calibration feeds for the Q/DQ generation graphs, recorded from the real sampler.

Post-training quantization is only as good as the activations it calibrates on. A diffusion
model's activations change a lot over the trajectory (pure noise at sigma = 1, almost data at the
end), so the feeds here are recorded by running the PyTorch model through the same sampling loop
the runtime runs, for every prompt and every step:

* the DiT: the calls of the config's flow sampler (`runtime.samplers.flow_plan`), CFG batch
  [zeros, cond], the plan's update;
* the decoder UNet: the calls of the config's decoder sampler (`runtime.samplers.decoder_plan`
  on the decoder config), CFG batch [cond, negative] with the decoder's negative features (the
  blank prompt sampled once, as the pipeline does), the plan's input scale and update;
* the VAE: the final latents.

The sampling runs phase by phase over all prompts (condition every prompt, then run the DiT,
then the UNet), so a build loads one component at a time: a 4b text decoder, DiT and UNet
together are ~28 GB in fp32, one at a time at most ~10 GB. The models may be on a GPU; feeds are
numpy on the host.

Noise follows `training.flow.host_noise` (DiT noise first, decoder noise second); prompt `j` uses
seed `seed + j`. The feeds are keyed by graph name and named like the spec inputs, with the
spec's dtypes, so each one can be fed to the ONNX graph as is.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from runtime.samplers import decoder_plan, dit_feeds, flow_plan, unet_feeds
from runtime.schedule import cfg_combine
from training.data.shapes import format_caption, sample_spec
from training.flow import host_noise, sample_features
from training.model.backbone import generation_ids
from training.model.blip3o import BLIP3o

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
CALIBRATED_GRAPHS = ("dit", "dit_step", "unet", "unet_step", "vae_decoder")


def default_prompts(n: int = 32, seed: int = 1234) -> list[str]:
    """`n` distinct shapes-world captions drawn with a fixed seed (training distribution).

    Drawn from the training caption grammar rather than the mini-GenEval prompt set, so that
    calibrating does not touch the evaluation prompts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    for _ in range(100 * n):
        caption = format_caption(sample_spec(rng))
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == n:
            return prompts
    raise ValueError(f"could not draw {n} distinct captions; got {len(prompts)}")


def load_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file, one per line; blank lines and `#` comments are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration prompt file {path} does not exist")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"calibration prompt file {path} holds no prompts")
    return prompts


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _run(fn, feeds: Feeds, device) -> np.ndarray:
    """Call a torch function on numpy feeds (positional, in spec order); numpy result."""
    return _np(fn(*(torch.from_numpy(a).to(device) for a in feeds.values())))


def _subsample(records: list[tuple[int, Feeds]], max_samples: int | None) -> list[Feeds]:
    """Keep at most `max_samples` feeds, evenly over (step, prompt) so every step stays covered."""
    if max_samples is None or len(records) <= max_samples:
        return [feeds for _, feeds in records]
    ordered = sorted(range(len(records)), key=lambda i: (records[i][0], i))  # step-major
    picks = np.linspace(0, len(ordered) - 1, max_samples).round().astype(int)
    return [records[ordered[i]][1] for i in picks]


def _conditioning(parts, prompt: str, template: bool, device) -> np.ndarray:
    ids = generation_ids(parts.tokenizer, prompt, parts.config.backbone, template=template)
    return _np(parts.model.conditioning(torch.tensor([ids], device=device)))  # (1, 64, H)


def collect_step_feeds(pipeline, prompts: list[str], *, seed: int = 0, **options):
    """Record the exact feeds of the generation graphs while sampling each prompt in PyTorch.

    Returns `{graph: [feeds, ...]}` for `dit_step` and `unet_step` (one feed per prompt and
    step), `dit` and `unet` (their CFG-batch inputs at every step) and `vae_decoder` (one per
    prompt). Batch size 1 per prompt; prompt `j` uses seed `seed + j`. Options: those of
    `collect_feed_sets`.
    """
    return collect_feed_sets(pipeline, {"feeds": (prompts, seed)}, **options)["feeds"]


@torch.no_grad()
def collect_feed_sets(
    pipeline,
    sets: dict[str, tuple[list[str], int]],
    *,
    steps: int,
    guidance: float,
    decoder_steps: int,
    decoder_guidance: float,
    max_samples: int | None = None,
    graphs: tuple[str, ...] = CALIBRATED_GRAPHS,
    device=None,
) -> dict[str, dict[str, list[Feeds]]]:
    """Feeds of several prompt sets (name -> (prompts, seed)), recorded phase by phase.

    `pipeline` is a `ReferencePipeline`, or a function of a phase name ("text", "dit", "unet")
    giving an object with the `config`, `model`, `decoder` and `tokenizer` that phase runs:
    all prompts are conditioned first, then sampled by the DiT, then by the UNet, so only one
    component need be in memory at a time. `graphs` limits what is recorded (the UNet phase
    runs only when a UNet or VAE graph is asked for); `max_samples` caps each graph's list,
    keeping feeds spread evenly over the steps; `device` is where the models are (default:
    that of the latent queries).
    """
    load = pipeline if callable(pipeline) else (lambda phase: pipeline)
    for prompts, _ in sets.values():
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    for name, value in (("steps", steps), ("decoder_steps", decoder_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
    unknown = sorted(set(graphs) - set(CALIBRATED_GRAPHS))
    if unknown:
        raise ValueError(f"unknown graph(s) {unknown}; valid: {', '.join(CALIBRATED_GRAPHS)}")

    text = load("text")
    cfg = text.config
    device = device if device is not None else text.model.latent_queries.device
    blank = _conditioning(text, "", False, device)  # the decoder negative's prompt
    conds = {n: [_conditioning(text, p, True, device) for p in ps] for n, (ps, _) in sets.items()}
    del text
    records = {n: {g: [] for g in CALIBRATED_GRAPHS} for n in sets}
    dit = load("dit").model
    s = cfg.sampler
    (noise,) = host_noise(s.negative_seed, _feature_shape(cfg))
    negative = sample_features(
        dit.velocity,
        torch.from_numpy(blank).to(device),
        noise.to(device),
        steps=s.steps,
        guidance=s.guidance,
    )
    negative = _np(BLIP3o.features_to_tokens(negative))  # (1, 64, C)
    finished = {}
    for name, (_, seed) in sets.items():
        finished[name] = [
            _sample_dit(dit, cond, seed + j, records[name], cfg, steps, guidance, device)
            for j, cond in enumerate(conds[name])
        ]
    del dit
    if set(graphs) & {"unet", "unet_step", "vae_decoder"}:
        decoder = load("unet").decoder
        for name in sets:
            for features, latent_noise in finished[name]:
                latents = _sample_unet(
                    decoder, features, latent_noise, negative, records[name], cfg,
                    decoder_steps, decoder_guidance, device,
                )  # fmt: skip
                records[name]["vae_decoder"].append((0, {"latents": latents}))
    out = {
        name: {g: _subsample(r[g], max_samples) for g in CALIBRATED_GRAPHS if g in graphs}
        for name, r in records.items()
    }
    log.info(
        "calibration feeds: %s", {n: {g: len(v) for g, v in o.items()} for n, o in out.items()}
    )
    return out


def _feature_shape(cfg) -> tuple[int, int, int, int]:
    return (1, cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size)


def _sample_dit(dit, cond, seed, records, cfg, steps, guidance, device):
    """One prompt's DiT trajectory, recorded; returns (feature tokens, the decoder's noise)."""
    dec = cfg.decoder
    latent_shape = (1, dec.latent_channels, dec.latent_size, dec.latent_size)
    noise, latent_noise = (_np(n) for n in host_noise(seed, _feature_shape(cfg), latent_shape))
    cond_in = np.concatenate([np.zeros_like(cond), cond])  # (2, 64, H)
    x = noise  # (1, C, s, s)
    prev = np.zeros_like(x)
    for i, call in enumerate(flow_plan(cfg.sampler.sampler, steps).calls):
        t = np.array([call.timestep], np.int64)  # (1,)
        batch = dict(x=np.concatenate([x, x]), timestep=np.repeat(t, 2), z_latents=cond_in)
        records["dit_step"].append((i, dit_feeds(call, x, prev, cond, guidance)))
        records["dit"].append((i, batch))
        v = _run(dit.velocity, batch, device)  # (2, C, s, s) [uncond, cond]
        v = cfg_combine(v[:1], v[1:], guidance)
        x = (x + np.float32(call.c_velocity) * v + np.float32(call.c_prev) * prev).astype(x.dtype)
        prev = v
    features = BLIP3o.features_to_tokens(torch.from_numpy(x)).numpy()  # (1, 64, C)
    return features, latent_noise


def _sample_unet(decoder, features, latent_noise, negative, records, cfg, steps, guidance, device):
    """One prompt's UNet trajectory, recorded; returns the final latents (1, 4, l, l)."""
    plan = decoder_plan(
        cfg.sampler.decoder_sampler, steps, dataclasses.asdict(cfg.decoder)
    )
    feats_in = np.concatenate([features, negative])  # (2, 64, C)
    latents = (latent_noise * np.float32(plan.init_noise_sigma)).astype(np.float32)
    prev = np.zeros_like(latents)
    for i, call in enumerate(plan.calls):
        sample = np.concatenate([latents, latents]) * np.float32(call.in_scale)  # (2, 4, l, l)
        batch = dict(
            sample=sample,
            timestep=np.full(2, call.timestep, np.float32),
            encoder_hidden_states=feats_in,
        )
        step = unet_feeds(call, latents, prev, features, negative, guidance)
        records["unet_step"].append((i, step))
        records["unet"].append((i, batch))
        eps = _run(decoder.epsilon, batch, device)  # (2, 4, l, l) [cond, neg]
        eps = cfg_combine(eps[1:], eps[:1], guidance)
        denoised = np.float32(call.d_sample) * latents + np.float32(call.d_eps) * eps
        latents = (
            np.float32(call.c_sample) * latents
            + np.float32(call.c_eps) * eps
            + np.float32(call.c_prev) * prev
        ).astype(np.float32)
        prev = denoised
    return latents
