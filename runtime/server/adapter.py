"""The server's link to the runtime core, beyond its jobs (`Generator.start` and
`runtime.jobs.generation.step_jobs`, `runtime.jobs.answer.TokenJob`):

- `max_batch(gen)`: the rows one step-graph call takes.
- `answer_of(job)`: a finished token job as OpenAI reports it (usage counts, finish reason).
- `generator_with_sessions(...)`: a Generator over someone else's sessions (Triton's BLS).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.jobs.answer import TokenJob


def max_batch(gen) -> int:
    """Rows one call of the step graphs takes: the smallest `batch` max of the three graphs."""
    return min(
        gen.folder.spec(name).dim("batch").max
        for name in ("dit_step", "unet_step", "vae_decoder")
    )


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # OpenAI's: "stop" (end of sequence) or "length" (max_tokens, context)


def answer_of(job: TokenJob) -> Answer:
    """A finished token job as OpenAI reports it: the text, usage counts, finish reason."""
    return Answer(
        text=job.text(),
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
