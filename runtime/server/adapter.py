"""The server's link to the runtime core, beyond `Generator.start` and `runtime.generation`'s
`step_jobs` (the engine's one sampling loop):

- `max_batch(gen)`: the rows one step-graph call takes.
- `answer(...)`: image understanding with exact token counts and a finish reason, read from the
  runtime's prompt encoder while `answer_tokens` runs.
- `generator_with_sessions(...)`: a Generator over someone else's sessions (Triton's BLS).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.manifest import graph_spec
from runtime.understanding import MAX_NEW_TOKENS, answer_tokens


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
