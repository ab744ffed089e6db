"""Calibration feeds for the Q/DQ generation graphs, recorded from the runtime's own loop.

Post-training quantization is only as good as the activations it calibrates on. A diffusion
model's activations change a lot over the trajectory (pure noise at sigma = 1, almost data at the
end), so the feeds here are what the graphs receive while the runtime generates, for every prompt
and every call: `runtime.jobs.generation`'s jobs (the only sampling loop there is) run over a
Generator whose sessions are the export wrappers over the PyTorch model
(`export.model_sessions`), wrapped by a `Recorder` that keeps each feed dict. So the samplers,
the CFG batches, the decoder negative (the folder's built file) and the noise convention are the
runtime's by construction. The unfused `dit` / `unet` graphs' feeds are the CFG batch inside
each step call (`dit_batch`, `unet_batch`: the step wrappers' batch layout).

The jobs are stepped stage by stage over all prompts (every prefill, then the DiT, then the
UNet, then the VAE), so a build loads one component at a time: a 4b text decoder, DiT and UNet
together are ~28 GB in fp32, one at a time at most ~10 GB. The models may be on a GPU; feeds are
numpy on the host, named and typed like the spec inputs, so each can be fed to the ONNX graph as
is. Prompt `j` of a set uses seed `seed + j`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.data.shapes import format_caption, sample_spec

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


def _subsample(records: list[tuple[int, Feeds]], max_samples: int | None) -> list[Feeds]:
    """Keep at most `max_samples` feeds, evenly over (step, prompt) so every step stays covered."""
    if max_samples is None or len(records) <= max_samples:
        return [feeds for _, feeds in records]
    ordered = sorted(range(len(records)), key=lambda i: (records[i][0], i))  # step-major
    picks = np.linspace(0, len(ordered) - 1, max_samples).round().astype(int)
    return [records[ordered[i]][1] for i in picks]


class Recorder:
    """Wraps a Generator's sessions so that every feed dict they run is kept (host copies),
    per graph in call order: `Recorder.feeds[graph]`."""

    def __init__(self) -> None:
        self.feeds: dict[str, list[Feeds]] = {}

    def wrap(self, session) -> RecordingSession:
        return RecordingSession(session, self.feeds.setdefault(session.spec.name, []))


class RecordingSession:
    def __init__(self, session, log: list[Feeds]) -> None:
        self.session, self.log = session, log
        self.spec = session.spec

    def run(self, feeds: Feeds) -> dict:
        host = self.session.to_host
        self.log.append({k: np.array(host(v), copy=True) for k, v in feeds.items()})
        return self.session.run(feeds)

    def to_host(self, value):
        return self.session.to_host(value)

    def close(self) -> None:
        self.session.close()


def dit_batch(step: Feeds) -> Feeds:
    """The unfused `dit` graph's feeds inside one `dit_step` call: its CFG batch [zeros, cond]."""
    x, cond = step["latents"], step["cond"]
    b = x.shape[0]
    return dict(
        x=np.concatenate([x, x]),
        timestep=np.repeat(step["timestep"], 2 * b),
        z_latents=np.concatenate([np.zeros_like(cond), cond]),
    )


def unet_batch(step: Feeds) -> Feeds:
    """The unfused `unet` graph's feeds inside one `unet_step` call: [features, negative]."""
    x, feats = step["latents"], step["features"]
    b = x.shape[0]
    return dict(
        sample=(np.concatenate([x, x]) * step["in_scale"][0]).astype(x.dtype),
        timestep=np.repeat(step["timestep"], 2 * b).astype(np.float32),
        encoder_hidden_states=np.concatenate([feats, np.repeat(step["negative"], b, axis=0)]),
    )


# stage of a generation job -> the graph whose calls make it up
_STAGE_GRAPH = {"dit": "dit_step", "unet": "unet_step", "vae_decoder": "vae_decoder"}


def collect_feed_sets(
    gen,
    recorder: Recorder,
    sets: dict[str, tuple[list[str], int]],
    *,
    steps: int,
    guidance: float,
    decoder_steps: int,
    decoder_guidance: float,
    max_samples: int | dict[str, int] | None = None,
    graphs: tuple[str, ...] = CALIBRATED_GRAPHS,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, dict[str, list[Feeds]]]:
    """Feeds of several prompt sets (name -> (prompts, seed)), recorded from the runtime's loop.

    `gen` is a `runtime.Generator` over the model (`export.model_sessions`) whose sessions
    `recorder` wraps. One generation job per prompt (prompt `j` of a set: seed `seed + j`, one
    image, the folder's samplers), all stepped stage by stage (every prefill, then every DiT
    call, then the UNet's, then the VAE's), so one model component is in memory at a time.
    Returns per set `{graph: [feeds, ...]}`: `dit_step`, `unet_step` (one per prompt and call),
    `dit`, `unet` (the CFG batch inside each call) and `vae_decoder` (one per prompt); `graphs`
    limits what is returned and what runs (the UNet only for a UNet or VAE graph, the VAE only
    for its own);
    `max_samples` caps each list (or, as a dict, the lists of the sets it names), keeping feeds
    spread evenly over the steps and prompts. `progress(done, total, what)` is called after
    each call of the loop (`what`: its stage and prompt).
    """
    for prompts, _ in sets.values():
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    for name, value in (("steps", steps), ("decoder_steps", decoder_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    caps = max_samples if isinstance(max_samples, dict) else dict.fromkeys(sets, max_samples)
    for cap in caps.values():
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
    unknown = sorted(set(graphs) - set(CALIBRATED_GRAPHS))
    if unknown:
        raise ValueError(f"unknown graph(s) {unknown}; valid: {', '.join(CALIBRATED_GRAPHS)}")

    settings = dict(steps=steps, guidance=guidance, decoder_steps=decoder_steps,
                    decoder_guidance=decoder_guidance, num_images=1)  # fmt: skip
    jobs = [
        (name, gen.start(prompt, seed=seed + j, **settings))
        for name, (prompts, seed) in sets.items()
        for j, prompt in enumerate(prompts)
    ]
    stages = ["prefill", "dit"]
    if set(graphs) & {"unet", "unet_step", "vae_decoder"}:
        stages.append("unet")
    if "vae_decoder" in graphs:
        stages.append("vae_decoder")
    records = {n: {g: [] for g in CALIBRATED_GRAPHS} for n in sets}
    calls = {"prefill": lambda j: 1, "dit": lambda j: len(j.flow.calls),
             "unet": lambda j: len(j.decoder.calls), "vae_decoder": lambda j: 1}  # fmt: skip
    total, done = sum(calls[stage](job) for stage in stages for _, job in jobs), 0
    try:
        for stage in stages:
            for j, (name, job) in enumerate(jobs):
                graph = _STAGE_GRAPH.get(stage)
                start = len(recorder.feeds.get(graph, ())) if graph else 0
                while job.stage == stage:
                    job.step()
                    done += 1
                    if progress is not None:
                        progress(done, total, f"{stage}, prompt {j + 1}/{len(jobs)}")
                if graph:
                    calls = recorder.feeds[graph][start:]
                    records[name][graph] += list(enumerate(calls))
    finally:
        for _, job in jobs:
            job.cancel()  # stepped stage by stage, never to the end: nothing stays open
    for r in records.values():
        r["dit"] = [(i, dit_batch(f)) for i, f in r["dit_step"]]
        r["unet"] = [(i, unet_batch(f)) for i, f in r["unet_step"]]
    out = {
        name: {g: _subsample(r[g], caps.get(name)) for g in CALIBRATED_GRAPHS if g in graphs}
        for name, r in records.items()
    }
    log.info(
        "calibration feeds: %s", {n: {g: len(v) for g, v in o.items()} for n, o in out.items()}
    )
    return out
