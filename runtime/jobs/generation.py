"""Text-to-image as a caller-driven job: prefill, DiT flow steps, UNet steps, VAE decode.

`GenerationJob.step()` does one unit of work (one session call) and returns; a host shows
progress and may cancel between steps. The step graphs (`dit_step`, `unet_step`) carry CFG,
guidance and the sampler update, so the loop only feeds each call's scalars (the sampler's plan,
`runtime.jobs.samplers`); latents and the multistep state stay in the backend's arrays (device
buffers on GPU backends).

This is the runtime's one sampling loop. `step_jobs(gen, jobs)` makes the next session call for
one job, or for several jobs at the same call of the same plan (equal `key()`: the server's
step-level batching), their rows concatenated along the batch axis and split back after the
call; `GenerationJob.step()` is `step_jobs` over the job alone. Each job keeps its own seeded
noise and multistep state, so a batched job computes what it computes alone.

The job owns its stages: the prompt's conditioning (`conditioning`: the prefill over the
prompt's embeddings and the latent queries) and the decoder's negative (read from the folder,
`EngineFolder.negative_features`) are computed here, not in the Generator.

Noise convention (shared with the PyTorch reference): one `np.random.default_rng(seed)` draws
the DiT's noise (N, C, 8, 8) first and the decoder's (N, 4, l, l) second, float32.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from runtime import validate
from runtime.errors import UserError
from runtime.jobs.job import Job
from runtime.jobs.samplers import decoder_plan, dit_feeds, flow_plan, unet_feeds
from runtime.params import GeneratorParams

HINT = "lower the guidance scales or check the engine folder (python export/check.py)"


def draw_noise(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(int(seed))
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


class GenerationJob(Job):
    """One generation, advanced by `step()`; `result()` returns the PIL images when done.

    `stage` is the stage the next step runs ("prefill", "dit", "unet", "vae_decoder", then
    "done"), `call` the index of the next call within it; `done_steps` of `total`. `features`
    holds the DiT's (N, 64, C) float32 image features once the DiT stage is over. `template`:
    False feeds the prompt as raw text (the blank-prompt decoder negative)."""

    what = "generation"

    def __init__(self, gen, prompt: str, params: GeneratorParams, *, template: bool = True) -> None:
        if not params.is_resolved:
            raise ValueError(f"params must be resolved against the folder first, got {params}")
        super().__init__(gen)
        # raw text (the manifest's blank negative prompt) may be empty; a user's prompt may not
        self.prompt = validate.text("prompt", prompt) if template else prompt
        self.params, self.template = params, template
        n, folder = params.num_images, gen.folder
        self.feature_shape = folder.feature_shape(n)
        self.noise, self.latent_noise = draw_noise(
            params.seed, self.feature_shape, folder.latent_shape(n)
        )
        self.flow = flow_plan(params.sampler, params.steps)
        self.decoder = decoder_plan(
            params.decoder_sampler, params.decoder_steps, gen.config["decoder"]
        )
        self.total = 1 + len(self.flow.calls) + len(self.decoder.calls) + 1
        self.done_steps = 0
        self.stage, self.call = "prefill", 0
        self.features: np.ndarray | None = None
        self.latents = self.state = self.cond = self._features_in = self._negative_in = None
        self._images: list[Image.Image] | None = None

    @property
    def rows(self) -> int:
        return self.params.num_images

    def key(self) -> tuple:
        """Jobs with equal keys can share the next session call (`step_jobs`)."""
        p = self.params
        if self.stage == "dit":
            return ("dit", self.call, p.sampler, p.steps, p.guidance)
        if self.stage == "unet":
            return ("unet", self.call, p.decoder_sampler, p.decoder_steps, p.decoder_guidance)
        if self.stage == "prefill":
            return ("prefill", id(self))  # prompts differ in length: prefills are not batched
        return (self.stage,)

    def step(self) -> str:
        """Run the next unit of work; returns the stage it belonged to."""
        with self.gen.lock:  # one session call at a time per Generator, jobs interleaved
            stage = step_jobs(self.gen, [self])
            if self.error is not None:
                raise self.error
            return stage

    def _result(self) -> list[Image.Image]:
        return self._images

    def _release(self) -> None:
        self.latents = self.state = self.cond = self._features_in = self._negative_in = None


def step_jobs(gen, jobs: list[GenerationJob]) -> str:
    """The next session call for `jobs` (equal `key()`); returns the stage it ran. A job whose
    output fails its check gets `error` and is done; the others go on. A session call that
    raises fails every job of the call. Call it holding `gen.lock`."""
    first = jobs[0]
    for job in jobs:
        if job.key() != first.key():
            raise ValueError(f"jobs at {job.key()} and {first.key()} cannot share a call")
    for job in jobs:
        job._check_steppable()
    stage = first.stage
    try:
        _STEPS[stage](gen, jobs)
    except BaseException as err:
        for job in jobs:
            if not job.done:
                job._fail(err)
        raise
    for job in jobs:
        job.done_steps += 1
        if job.stage == "done" and not job.done:
            job._end()
    return stage


def conditioning(gen, prompt: str, *, template: bool = True) -> np.ndarray:
    """(1, 64, H) DiT conditioning: prefill over the prompt embeddings + latent queries."""
    folder = gen.folder
    ids = gen.prompts.generation_ids(prompt, template=template)
    queries = folder.latent_queries  # (1, 64, H)
    limit = folder.prefill_limit() - queries.shape[1]
    if len(ids) > limit:
        raise UserError(
            f"prompt is {len(ids)} tokens; this engine folder's prefill takes at most "
            f"{limit} (+ {queries.shape[1]} queries). Shorten the prompt."
        )
    embeds = np.concatenate([gen.embed(ids)[None], queries.astype(np.float32)], 1)  # (1, S, H)
    s = embeds.shape[1]
    positions = np.broadcast_to(np.arange(s, dtype=np.int64), (3, 1, s)).copy()
    prefill = gen.session("prefill")
    out = prefill.run({"inputs_embeds": embeds.astype(folder.io_dtype), "position_ids": positions})
    hidden = prefill.to_host(out["hidden_states"]).astype(np.float32)  # (1, S, H)
    gen.release("prefill")
    return hidden[:, -queries.shape[1] :]  # (1, 64, H)


def decode_latents(gen, jobs: list[GenerationJob]) -> list[np.ndarray]:
    """(N, 3, H, W) float32 images of each job's current decoder latents: the last stage, and
    the server's partial images."""
    vae = gen.session("vae_decoder")
    images = vae.run({"latents": _rows(vae, jobs, "latents")})["images"]
    images = vae.to_host(images).astype(np.float32)  # (R, 3, H, W)
    return np.split(images, _bounds(jobs))


# the stages --------------------------------------------------------------------------------
def _prefill(gen, jobs) -> None:
    io = gen.io_dtype
    for job in jobs:  # one: prefill keys are unique
        cond = conditioning(gen, job.prompt, template=job.template)  # (1, 64, H) host array
        job.cond = np.repeat(cond, job.rows, axis=0).astype(io)
        job.latents = job.noise.astype(io)
        job.state = np.zeros_like(job.latents)  # the multistep state: the last velocity
        job.stage, job.call = "dit", 0


def _dit(gen, jobs) -> None:
    first, dit = jobs[0], gen.session("dit_step")
    call = first.flow.calls[first.call]
    feeds = dit_feeds(
        call, _rows(dit, jobs, "latents"), _rows(dit, jobs, "state"), _rows(dit, jobs, "cond"),
        first.params.guidance,
    )  # fmt: skip
    out = dit.run(feeds)
    _split(dit, jobs, latents=out["next_latents"], state=out["velocity"])
    for job in jobs:
        job.call += 1
        if job.call < len(job.flow.calls):
            continue
        grid = dit.to_host(job.latents).astype(np.float32)  # (N, C, 8, 8)
        features = grid.reshape(grid.shape[0], grid.shape[1], -1).transpose(0, 2, 1).copy()
        try:
            validate.finite("the DiT's image features", features, HINT)
        except Exception as err:
            job._fail(err)
            continue
        job.features = features  # (N, 64, C)
        job._features_in = np.ascontiguousarray(features.astype(gen.io_dtype))
        job.latents = (job.latent_noise * job.decoder.init_noise_sigma).astype(gen.io_dtype)
        job.state = np.zeros_like(job.latents)  # the last x0 prediction
        job.stage, job.call = "unet", 0
    if all(job.stage != "dit" for job in jobs):
        gen.release("dit_step")


def _unet(gen, jobs) -> None:
    first, unet = jobs[0], gen.session("unet_step")
    if first._negative_in is None:  # read at its first UNet call (the DiT stage needs none)
        first._negative_in = gen.folder.negative_features.astype(gen.io_dtype)  # (1, 64, C)
    feeds = unet_feeds(
        first.decoder.calls[first.call], _rows(unet, jobs, "latents"), _rows(unet, jobs, "state"),
        _rows(unet, jobs, "_features_in"), first._negative_in, first.params.decoder_guidance,
    )  # fmt: skip
    out = unet.run(feeds)
    _split(unet, jobs, latents=out["next_latents"], state=out["denoised"])
    for job in jobs:
        job.call += 1
        if job.call == len(job.decoder.calls):
            job.stage, job.call = "vae_decoder", 0
    if all(job.stage != "unet" for job in jobs):
        gen.release("unet_step")


def _vae(gen, jobs) -> None:
    for job, images in zip(jobs, decode_latents(gen, jobs)):
        try:
            validate.finite("the decoded image", images, HINT)
        except Exception as err:
            job._fail(err)
            continue
        job._images = [to_pil(x) for x in images]
        job.stage = "done"
    gen.release("vae_decoder")


_STEPS = {"prefill": _prefill, "dit": _dit, "unet": _unet, "vae_decoder": _vae}


def _bounds(jobs) -> np.ndarray:
    """Where each job's rows start in a batch, after the first's."""
    return np.cumsum([job.rows for job in jobs])[:-1]


def _rows(session, jobs, name: str):
    """The jobs' `name` arrays as one batch: a job's own array (left where the backend put it)
    when alone, else their host copies concatenated."""
    if len(jobs) == 1:
        return getattr(jobs[0], name)
    return np.concatenate([session.to_host(getattr(job, name)) for job in jobs])


def _split(session, jobs, **outputs) -> None:
    """Give each job its rows of each output (the whole output when alone)."""
    if len(jobs) == 1:
        for name, value in outputs.items():
            setattr(jobs[0], name, value)
        return
    for name, value in outputs.items():
        for job, part in zip(jobs, np.split(session.to_host(value), _bounds(jobs))):
            setattr(job, name, part)


def blank_prompt_features(gen) -> np.ndarray:
    """(1, 64, C) BLIP3-o's decoder negative as published: the DiT's features of the manifest's
    blank prompt (raw text, no template), sampled once with the sampler's steps, guidance and
    `negative_seed`. The build's `negative` stage runs it; the runtime reads the file."""
    s = gen.manifest["sampler"]
    params = GeneratorParams(
        sampler=s["sampler"], steps=s["steps"], guidance=s["guidance"], seed=s["negative_seed"]
    ).resolved(s, 1)  # one row, whatever batch the folder's graphs were pinned to
    job = GenerationJob(gen, gen.manifest["template"]["negative_prompt"], params, template=False)
    while job.stage in ("prefill", "dit"):
        job.step()
    job.cancel()
    return job.features


def to_pil(pixels: np.ndarray) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB image (same rounding as the reference pipeline)."""
    array = (np.clip(pixels, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return Image.fromarray(array)
