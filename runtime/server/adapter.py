"""The server's link to the runtime core, beyond `Generator.start` and `runtime.generation`'s
`step_jobs` (the engine's one sampling loop):

- `max_batch(gen)`: the rows one step-graph call takes.
- `answer(...)`: image understanding as OpenAI reports it (usage counts, finish reason), from
  the runtime's token job.
- `generator_with_sessions(...)`: a Generator over someone else's sessions (Triton's BLS).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.manifest import graph_spec
from runtime.understanding import AnswerParams, TokenJob, stream_text


def max_batch(gen) -> int:
    """Rows one call of the step graphs takes: the smallest `batch` max of the three graphs."""
    return min(
        graph_spec(gen.manifest, name).dim("batch").max
        for name in ("dit_step", "unet_step", "vae_decoder")
    )


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # OpenAI's: "stop" (end of sequence) or "length" (max_tokens, context)


def answer(gen, image, question: str, options: AnswerParams, stream=None) -> Answer:
    """The answer about `image` (greedy unless `options.temperature` > 0) with usage counts;
    `stream(text)` gets the text as it is decoded."""
    with gen._lock:
        job = TokenJob(gen, image, question, options)
        text = stream_text(job, stream)
    return Answer(
        text=text,
        prompt_tokens=job.prompt_tokens,
        completion_tokens=len(job.tokens),
        finish_reason="stop" if job.finish_reason == "eos" else "length",  # length, cache_full
    )




def generator_with_sessions(folder, make_session):
    """A Generator over `folder`'s host assets whose generation graphs are `make_session(spec)`
    (the Triton orchestrator's BLS sessions): the runtime's own loop, someone else's sessions
    (Triton holds the graphs: no ONNX Runtime, no file checks here)."""
    from runtime.generator import Generator

    return Generator.from_dir(folder, device="cpu", verify="none", open_graph=make_session)
