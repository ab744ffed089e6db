"""Image understanding as a caller-driven token job: vision -> prefill -> one decode per token.

    job = gen.start_answer(image, "Describe the image.", max_new_tokens=32)
    while not job.done:
        job.step()                                # one session call, one token
    print(job.result(), job.finish_reason)        # "eos", "length" or "cache_full"

Host side: Qwen2.5-VL preprocessing, window-ordered vision feeds, the chat prompt with one
`<|image_pad|>` per merged patch token, M-RoPE position ids (3 rows) and their decode deltas,
token embedding lookups and the sampler (greedy by default; temperature / top-p from a seeded
generator per job).

KV cache: each job owns one preallocated cache of `(L, 1, KV, capacity, D)` keys and values,
sized once for its prompt and `max_new_tokens` (at most the decode graph's capacity). Prefill's
keys/values are written into its first rows; each decode step reads the cache in place (one
`cache_keys.{i}` / `cache_values.{i}` input per layer, views of the job's buffers) and
returns only the new token's row, which the job writes at the next position: a token costs
O(1) copies, whatever the context length. The cache lives where the backend's sessions read it
(`session.kv_cache`: device buffers bound by address on TensorRT; host arrays otherwise).
Since a job owns its cache and copies what it needs out of every session call, any number of
jobs may be open and stepped interleaved.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from runtime import validate
from runtime.errors import UserError
from runtime.host.image import prepare_image
from runtime.host.mrope import decode_position_ids, rope_index
from runtime.jobs.job import Job
from runtime.jobs.kv_cache import HostKVCache
from runtime.params import AnswerParams

FINISH_REASONS = ("eos", "length", "cache_full")


def sample_token(logits: np.ndarray, params: AnswerParams, rng: np.random.Generator) -> int:
    """The next token from (vocab,) logits: argmax at temperature 0, else a draw from the
    softmax at that temperature restricted to the smallest top-p nucleus (at least 1 token)."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), params.top_p)) + 1  # tokens to keep
    nucleus = order[: min(keep, len(order))]
    p = probs[nucleus] / probs[nucleus].sum()
    return int(nucleus[rng.choice(len(nucleus), p=p)])


class TokenJob(Job):
    """One answer, advanced by `step()` (one session call and one sampled token; the first runs
    vision and prefill). `done`, `finish_reason` ("eos", "length", "cache_full"; None while
    running, a cancelled or failed job has none), `tokens` (the answer's ids, eos excluded),
    `text()` (the answer so far), `cancel()` (frees the cache), `result()` (the text, to the end).
    `generate_next_token()` is `step()` under onnxruntime-genai's name.
    """

    what = "answer"

    def __init__(self, gen, image, question: str, params: AnswerParams) -> None:
        super().__init__(gen)
        self.params = params
        self.question = validate.text("question", question)
        self.feeds, self.grid = prepare_image(gen, image)  # preprocessing errors surface here
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._rng = np.random.default_rng(self.params.seed)
        self._cache = self._logits = self._deltas = None
        self.prompt_tokens = 0  # the chat prompt's length (image tokens included), at prefill
        self._position = 0  # cache rows filled = the next token's row
        self._pending: int | None = None  # sampled, not yet fed through decode
        self._streamed = ""  # the text `next_text` has handed out

    @property
    def capacity(self) -> int:
        return 0 if self._cache is None else self._cache.capacity

    def text(self) -> str:
        return self.gen.prompts.decode(self.tokens).strip()

    def step(self) -> int:
        """Run the next session call and sample one token; returns its id (eos included)."""
        with self.gen.lock:
            self._check_steppable()
            try:
                if self._logits is None:
                    self._prefill()
                elif self._pending is not None:
                    self._feed(self._pending)
                    self._pending = None
                return self._sample()
            except BaseException as err:
                self._fail(err)
                raise

    generate_next_token = step  # onnxruntime-genai's name; the README's before 0.4

    def next_text(self) -> str:
        """`step()`, then the text it added to the answer: "" while a character is still
        incomplete, and at eos. What streaming hosts send."""
        self.step()
        text = self.gen.prompts.decode(self.tokens) if self.tokens else ""
        new = text[len(self._streamed) :] if len(text) > len(self._streamed) else ""
        self._streamed = text
        return new

    def append_tokens(self, ids) -> None:
        """Feed token ids after the answer so far (e.g. a follow-up turn); the next token is
        sampled after them. Each id is one decode step into this job's cache."""
        vocab = self.gen.folder.embeddings.shape[0]
        ids = [validate.integer("token id", t, 0, vocab - 1) for t in ids]
        with self.gen.lock:
            self._check_steppable()
            if self._logits is None:
                self._prefill()
            for token in ([self._pending] if self._pending is not None else []) + ids:
                if self._position >= self.capacity:
                    raise UserError(
                        f"the KV cache is full ({self.capacity} rows); append fewer tokens"
                    )
                self._feed(token)
            self._pending = None

    def _result(self) -> str:
        return self.text()

    def _release(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        self.gen.release("decode")

    # steps ----------------------------------------------------------------------------------
    def _prefill(self) -> None:
        gen, b = self.gen, self.gen.config["backbone"]
        vision = gen.session("vision")
        image_embeds = vision.to_host(vision.run(self.feeds)["image_embeds"]).astype(np.float32)
        gen.release("vision")
        ids = gen.prompts.chat_ids(self.question, image_embeds.shape[0])
        limit = gen.folder.prefill_limit()
        if len(ids) > limit:
            raise UserError(f"question + image are {len(ids)} tokens; the prefill takes {limit}")
        embeds = gen.embed(ids)  # (S, H)
        embeds[ids == b["image_token_id"]] = image_embeds
        positions, self._deltas = rope_index(
            ids[None],
            self.grid,
            image_token_id=b["image_token_id"],
            vision_start_token_id=b["vision_start_token_id"],
            spatial_merge_size=b["vision"]["spatial_merge_size"],
        )
        prefill = gen.session("prefill")
        out = prefill.run(
            {"inputs_embeds": embeds[None].astype(gen.io_dtype), "position_ids": positions}
        )
        self._logits = prefill.to_host(out["logits"])[0]  # (vocab,)
        spec = gen.folder.spec("decode")
        _, kv, _, dim = spec.tensor("cache_keys.0").shape  # (B, KV, capacity, D) per layer
        most = spec.dim("capacity").max
        capacity = min(most, max(len(ids) + self.params.max_new_tokens - 1, 2))
        if len(ids) < capacity:  # room for at least one decode step
            decode = gen.session("decode")
            shape = (b["num_layers"], 1, kv, capacity, dim)
            make = getattr(decode, "kv_cache", None)
            self._cache = (
                make(shape, gen.io_dtype)
                if make is not None
                else HostKVCache(shape, gen.io_dtype, prefill.to_host)
            )
            self._cache.write(0, out["present_keys"], out["present_values"])  # copied out
        gen.release("prefill")  # after the copy: nothing of the job points into its buffers
        self.prompt_tokens = self._position = len(ids)

    def _feed(self, token: int) -> None:
        gen, cache = self.gen, self._cache
        decode = gen.session("decode")
        out = decode.run(
            {
                "inputs_embeds": gen.embed(np.array([token]))[None].astype(gen.io_dtype),
                "position_ids": decode_position_ids(self._position, self._deltas, 1),
                "cache_position": np.array([self._position], np.int64),
                **cache.feeds(),  # each layer's cache where it lies
            }
        )
        self._logits = decode.to_host(out["logits"])[0]  # (vocab,)
        cache.write(self._position, out["new_keys"], out["new_values"])  # one row, in place
        self._position += 1

    def _sample(self) -> int:
        validate.finite("the answer's logits", self._logits, "check the engine folder")
        token = sample_token(self._logits, self.params, self._rng)
        if token == self.gen.config["backbone"]["eos_token_id"]:
            self._finish("eos")
            return token
        self.tokens.append(token)
        if len(self.tokens) == self.params.max_new_tokens:
            self._finish("length")
        elif self._position >= self.capacity:  # no row left for this token
            self._finish("cache_full")
        else:
            self._pending = token
        return token

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._end()


def stream_text(job: TokenJob, stream: Callable[[str], None] | None = None) -> str:
    """Run a token job to its end; `stream` receives the text as it grows. If anything raises
    (a stream callback that stops because its client went away), the job is cancelled."""
    try:
        while not job.done:
            if stream is None:
                job.step()  # no text until the end: nothing decoded per token
            elif new := job.next_text():
                stream(new)
    except BaseException:
        job.cancel()
        raise
    return job.result()
