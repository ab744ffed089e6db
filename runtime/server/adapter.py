"""The server's one link to the runtime core: everything it needs from `Generator` goes here.

The runtime core is moving (a params object, an understanding token job with streaming and
finish reasons, an in-place KV cache). The server reads today's API through these functions
only, so a change of the core is a change of this file:

- `prepare(gen, ...)`: validated generation params, the seeded noise and the sampler plans of
  one request, taken from the runtime's own `GenerationJob` (so the server's noise convention and
  sampler plans are the runtime's, never a copy); the job object is not stepped.
- `dit_feeds` / `unet_feeds`: one call's feeds for a batch of rows: `runtime.samplers`' feeds,
  the ones the runtime's loop builds.
- `answer(...)`: image understanding with exact token counts and a finish reason, read from the
  runtime's prompt encoder while today's `answer_tokens` runs (the token job will report them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime import samplers
from runtime.manifest import graph_spec
from runtime.params import GeneratorParams
from runtime.understanding import MAX_NEW_TOKENS, answer_tokens


@dataclass
class Prepared:
    """One validated request: params, its noise and its sampler plans (host data)."""

    prompt: str
    params: GeneratorParams
    noise: np.ndarray  # (N, C, 8, 8) DiT noise
    latent_noise: np.ndarray  # (N, 4, l, l) decoder noise
    flow: samplers.FlowPlan  # the dit_step calls
    decoder: samplers.DecoderPlan  # the unet_step calls


def max_batch(gen) -> int:
    """Rows one call of the step graphs takes: the smallest `batch` max of the three graphs."""
    return min(
        graph_spec(gen.manifest, name).dim("batch").max
        for name in ("dit_step", "unet_step", "vae_decoder")
    )


def sampler_defaults(gen) -> dict:
    return dict(gen.manifest["sampler"])


def prepare(gen, prompt: str, **settings) -> Prepared:
    """Validate one request (a `UserError` names the bad value) and draw its noise. `settings`
    are `GeneratorParams` fields (`runtime.params.SETTINGS`)."""
    job = gen.start(prompt, **settings)
    gen._job_finished(job)  # never stepped: it holds nothing open
    return Prepared(
        prompt=job.prompt,
        params=job.params,
        noise=job.noise,
        latent_noise=job.latent_noise,
        flow=job.flow,
        decoder=job.decoder,
    )


def conditioning(gen, prompt: str) -> np.ndarray:
    """(1, 64, H) host conditioning of a generation prompt (one prefill call)."""
    return gen.conditioning(prompt)


def negative_features(gen) -> np.ndarray:
    return gen.negative_features()  # (1, 64, C)


def dit_feeds(prep: Prepared, i: int, latents, velocity, cond) -> dict:
    return samplers.dit_feeds(prep.flow.calls[i], latents, velocity, cond, prep.params.guidance)


def unet_feeds(prep: Prepared, i: int, latents, denoised, features, negative) -> dict:
    call, guidance = prep.decoder.calls[i], prep.params.decoder_guidance
    return samplers.unet_feeds(call, latents, denoised, features, negative, guidance)


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (max_tokens or the context)


class _CountingPrompts:
    """The Generator's prompt encoder, recording the prompt length and the tokens decoded."""

    def __init__(self, prompts) -> None:
        self._prompts = prompts
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def chat_ids(self, question, num_image_tokens):
        ids = self._prompts.chat_ids(question, num_image_tokens)
        self.prompt_tokens = len(ids)
        return ids

    def decode(self, ids):
        self.completion_tokens = max(self.completion_tokens, len(ids))
        return self._prompts.decode(ids)

    def __getattr__(self, name):
        return getattr(self._prompts, name)


class _CountingGen:
    def __init__(self, gen, prompts) -> None:
        self._gen, self.prompts = gen, prompts

    def __getattr__(self, name):
        return getattr(self._gen, name)


def answer(gen, image, question: str, *, max_tokens: int, stream=None) -> Answer:
    """Greedy answer about `image` with usage counts; `stream(text)` gets text as decoded."""
    prompts = _CountingPrompts(gen.prompts)
    with gen._lock:
        text = answer_tokens(
            _CountingGen(gen, prompts),
            image,
            question,
            max_new_tokens=max_tokens,
            stream=stream if stream is not None else (lambda _s: None),
        )
    context = graph_spec(gen.manifest, "decode").dim("capacity").max
    hit_limit = prompts.completion_tokens >= max_tokens or (
        prompts.prompt_tokens + prompts.completion_tokens > context
    )
    return Answer(
        text=text,
        prompt_tokens=prompts.prompt_tokens,
        completion_tokens=prompts.completion_tokens,
        finish_reason="length" if hit_limit else "stop",
    )


MAX_TOKENS = MAX_NEW_TOKENS


def generator_with_sessions(folder, make_session):
    """A Generator over `folder`'s host assets whose generation graphs are `make_session(spec)`
    (the Triton orchestrator's BLS sessions): the runtime's own loop, someone else's sessions
    (Triton holds the graphs: no ONNX Runtime, no file checks here)."""
    from runtime.generator import Generator

    return Generator.from_dir(folder, device="cpu", verify="none", open_graph=make_session)
