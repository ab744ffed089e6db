"""Text-to-image as a caller-driven job: prefill, DiT flow steps, UNet steps, VAE decode.

`GenerationJob.step()` does one unit of work (one session call) and returns; a host shows
progress and may cancel between steps. The step graphs (`dit_step`, `unet_step`) carry CFG,
guidance and the sampler update, so the loop only feeds each call's scalars (the sampler's plan,
`runtime.samplers`); latents and the multistep state stay in the backend's arrays (device
buffers on GPU backends).

Noise convention (shared with the PyTorch reference): one `np.random.default_rng(seed)` draws
the DiT's noise (N, C, 8, 8) first and the decoder's (N, 4, l, l) second, float32.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from runtime import checks
from runtime.params import GeneratorParams
from runtime.samplers import decoder_plan, dit_feeds, flow_plan, unet_feeds


def draw_noise(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(int(seed))
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


class GenerationJob:
    """One generation, advanced by `step()`; `result()` returns the PIL images when done."""

    def __init__(self, gen, prompt: str, params: GeneratorParams) -> None:
        if not params.is_resolved:
            raise ValueError(f"params must be resolved against the folder first, got {params}")
        self.gen = gen
        self.prompt = checks.text("prompt", prompt)
        self.params = params
        cfg = gen.config
        n = params.num_images
        d, dec = cfg["dit"], cfg["decoder"]
        self.feature_shape = (n, d["in_channels"], d["input_size"], d["input_size"])
        side = dec["image_size"] // 2 ** (len(dec["vae_block_out_channels"]) - 1)
        latent_shape = (n, dec["latent_channels"], side, side)
        self.noise, self.latent_noise = draw_noise(params.seed, self.feature_shape, latent_shape)
        self.flow = flow_plan(params.sampler, params.steps)
        self.decoder = decoder_plan(params.decoder_sampler, params.decoder_steps, dec)
        self.total = 1 + len(self.flow.calls) + len(self.decoder.calls) + 1
        self.done_steps = 0
        self.stage = "prefill"  # the stage the next `step()` runs ("done" at the end)
        self._images: list[Image.Image] | None = None
        self._work = self._run()
        gen._jobs.add(self)

    @property
    def done(self) -> bool:
        return self._images is not None

    def step(self) -> str:
        """Run the next unit of work; returns the stage it belonged to."""
        with self.gen._lock:  # one session call at a time per Generator, jobs interleaved
            if self.done:
                raise RuntimeError("this generation is finished; call result()")
            try:
                stage = next(self._work)
            except BaseException:
                self.gen._job_finished(self)  # a failed job holds no session open
                raise
            self.done_steps += 1
            if self.done:
                self.gen._job_finished(self)
            return stage

    def result(self) -> list[Image.Image]:
        while not self.done:
            self.step()
        return self._images

    def _run(self):
        gen, p = self.gen, self.params
        io = gen.io_dtype
        cond = gen.conditioning(self.prompt)  # (1, 64, H) host array
        cond = np.repeat(cond, p.num_images, axis=0).astype(io)
        self.stage = "dit"
        yield "prefill"
        features, last = None, len(self.flow.calls) - 1
        for i, features in enumerate(flow_features(gen, cond, self.noise, self.flow, p.guidance)):
            if features is None:
                if i == last:
                    self.stage = "unet"
                yield "dit"
        hint = "lower the guidance scales or check the engine folder (python export/check.py)"
        checks.finite("the DiT's image features", features, hint)
        negative = gen.negative_features()  # (1, 64, C)
        plan = self.decoder
        latents = (self.latent_noise * plan.init_noise_sigma).astype(io)
        denoised = np.zeros_like(latents)
        unet = gen.session("unet_step")
        feats, neg = np.ascontiguousarray(features.astype(io)), negative.astype(io)
        for i, call in enumerate(plan.calls):
            feeds = unet_feeds(call, latents, denoised, feats, neg, p.decoder_guidance)
            out = unet.run(feeds)
            latents, denoised = out["next_latents"], out["denoised"]
            if i == len(plan.calls) - 1:
                self.stage = "vae_decoder"
            yield "unet"
        gen.release("unet_step")
        vae = gen.session("vae_decoder")
        images = vae.to_host(vae.run({"latents": latents})["images"]).astype(np.float32)
        gen.release("vae_decoder")
        checks.finite("the decoded image", images, hint)
        self._images = [to_pil(x) for x in images]
        self.stage = "done"
        yield "vae_decoder"


def flow_features(gen, cond: np.ndarray, noise: np.ndarray, plan, guidance: float):
    """Guided flow sampling with the fused `dit_step` graph, one call per row of `plan`
    (`runtime.samplers.flow_plan`).

    A generator: yields None after each call, then the (N, 64, C) feature tokens (host, float32).
    cond (N, 64, H) and noise (N, C, 8, 8) are host arrays.
    """
    dit = gen.session("dit_step")
    latents = noise.astype(gen.io_dtype)
    velocity = np.zeros_like(latents)
    cond = cond.astype(gen.io_dtype)
    for call in plan.calls:
        out = dit.run(dit_feeds(call, latents, velocity, cond, guidance))
        latents, velocity = out["next_latents"], out["velocity"]
        yield None
    grid = dit.to_host(latents).astype(np.float32)  # (N, C, 8, 8)
    gen.release("dit_step")
    yield grid.reshape(grid.shape[0], grid.shape[1], -1).transpose(0, 2, 1).copy()  # (N, 64, C)


def blank_prompt_features(gen) -> np.ndarray:
    """(1, 64, C) BLIP3-o's decoder negative as published: the DiT's features of the manifest's
    blank prompt (raw text, no template), sampled once with the sampler's steps, guidance and
    `negative_seed`. The build's `negative` stage runs it; the runtime reads the file."""
    s = gen.manifest["sampler"]
    d = gen.config["dit"]
    (noise,) = draw_noise(
        s["negative_seed"], (1, d["in_channels"], d["input_size"], d["input_size"])
    )
    cond = gen.conditioning(gen.manifest["template"]["negative_prompt"], template=False)
    plan = flow_plan(s["sampler"], s["steps"])
    *_, negative = flow_features(gen, cond, noise, plan, s["guidance"])  # (1, 64, C)
    return negative


def to_pil(pixels: np.ndarray) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB image (same rounding as the reference pipeline)."""
    array = (np.clip(pixels, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return Image.fromarray(array)
