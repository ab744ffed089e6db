"""Image understanding as a caller-driven token job: vision -> prefill -> one decode per token.

    job = gen.start_answer(image, "Describe the image.", max_new_tokens=32)
    while not job.done:
        job.generate_next_token()
    print(job.text(), job.finish_reason)          # "eos", "length" or "cache_full"

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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from runtime import checks
from runtime.errors import UserError, UserTypeError
from runtime.graphs import cache_feeds
from runtime.image_preprocess import MAX_ASPECT_RATIO, preprocess_image
from runtime.manifest import graph_spec
from runtime.mrope import decode_position_ids, rope_index
from runtime.vision_feeds import vision_feeds

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before resizing
MAX_NEW_TOKENS = 1 << 16
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # grayscale PNG/TIFF of 16 bits


def load_image(image) -> Image.Image:
    """A PIL image, an (H, W, 3|4) uint8 array or a path, as an RGB image, with clear errors.

    16-bit grayscale images are scaled to 8 bits (not clipped, which would turn most of the
    range white)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise UserError(f"{path} is a folder, not an image")
        try:
            with Image.open(path) as f:
                if f.width * f.height > MAX_IMAGE_PIXELS:
                    raise UserError(
                        f"{path} is {f.width}x{f.height} px; at most {MAX_IMAGE_PIXELS} "
                        "pixels are accepted"
                    )
                f.load()
                image = f.copy()
        except (OSError, Image.DecompressionBombError) as err:
            raise UserError(f"cannot read an image from {path}: {err}") from err
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise UserError(
                f"an image array must be (H, W, 3) or (H, W, 4) uint8, got {image.shape} "
                f"{image.dtype}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UserTypeError(
            f"image must be a PIL image, an array or a path, got {type(image).__name__}"
        )
    if image.mode in _SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.float64)  # (H, W) in [0, 65535]
        image = Image.fromarray((np.clip(wide, 0, 65535) / 257).round().astype(np.uint8), "L")
    return image.convert("RGB")


def prepare_image(gen, image) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess an image for the vision graph: (image_embeds feeds, grid_thw)."""
    v = gen.config["backbone"]["vision"]
    image = load_image(image)
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise UserError(
            f"image of {image.width}x{image.height} px is too elongated; the aspect ratio "
            f"must be at most {MAX_ASPECT_RATIO}"
        )
    if min(image.size) < v["patch_size"]:
        raise UserError(
            f"image of {image.width}x{image.height} px is smaller than one "
            f"{v['patch_size']}x{v['patch_size']} vision patch"
        )
    pixels, grid = preprocess_image(
        image,
        patch_size=v["patch_size"],
        temporal_patch_size=v["temporal_patch_size"],
        merge_size=v["spatial_merge_size"],
        min_pixels=v["min_pixels"],
        max_pixels=v["max_pixels"],
    )
    feeds = vision_feeds(
        pixels,
        grid,
        spatial_merge_size=v["spatial_merge_size"],
        window_size=v["window_size"],
        patch_size=v["patch_size"],
    )
    feeds["pixel_values"] = feeds["pixel_values"].astype(gen.io_dtype)
    return feeds, grid


FINISH_REASONS = ("eos", "length", "cache_full")
MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class AnswerParams:
    """Sampling options of a token job: greedy when `temperature` is 0 (the default)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> AnswerParams:
        return replace(
            self,
            max_new_tokens=checks.integer("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS),
            temperature=checks.number("temperature", self.temperature, 0.0, MAX_TEMPERATURE),
            top_p=checks.number("top_p", self.top_p, 0.0, 1.0),
            seed=checks.integer("seed", self.seed, 0, 2**63 - 1),
        )


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


class HostKVCache:
    """A token job's KV cache as host arrays: what ONNX Runtime on CPU (and any backend without
    its own `kv_cache`) reads without a copy. `write` takes the backend's arrays."""

    def __init__(self, shape: tuple[int, ...], dtype, to_host) -> None:
        self.keys = np.zeros(shape, dtype)  # (L, B, KV, C, D)
        self.values = np.zeros(shape, dtype)
        self.capacity, self._to_host = shape[3], to_host
        self._feeds = cache_feeds(self.keys, self.values)  # fixed views: built once

    def write(self, start: int, keys, values) -> None:
        """Rows start.. of the cache from (L, B, KV, n, D) keys / values."""
        keys, values = self._to_host(keys), self._to_host(values)
        self.keys[..., start : start + keys.shape[3], :] = keys
        self.values[..., start : start + values.shape[3], :] = values

    def feeds(self) -> dict[str, np.ndarray]:
        """The decode graph's per-layer cache inputs: views of this cache, no copy."""
        return self._feeds

    def close(self) -> None:
        self.keys = self.values = self._feeds = None


class TokenJob:
    """One answer, advanced by `generate_next_token()` (the first call runs vision and prefill).

    `done` / `is_done()`, `finish_reason` ("eos", "length", "cache_full"), `tokens` (the answer's
    ids, eos excluded), `text()`, `cancel()` (frees the cache), `result()` (the text, to the end).
    """

    def __init__(self, gen, image, question: str, params: AnswerParams) -> None:
        self.gen, self.params = gen, params.validate()
        self.question = checks.text("question", question)
        self.feeds, self.grid = prepare_image(gen, image)  # preprocessing errors surface here
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._rng = np.random.default_rng(self.params.seed)
        self._cache = self._logits = self._deltas = None
        self.prompt_tokens = 0  # the chat prompt's length (image tokens included), at prefill
        self._position = 0  # cache rows filled = the next token's row
        self._pending: int | None = None  # sampled, not yet fed through decode
        self._streamed = ""  # the text `next_text` has handed out
        gen._jobs.add(self)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def is_done(self) -> bool:
        return self.done

    @property
    def capacity(self) -> int:
        return 0 if self._cache is None else self._cache.capacity

    def text(self) -> str:
        return self.gen.prompts.decode(self.tokens).strip()

    def generate_next_token(self) -> int:
        """Run the next session call and sample one token; returns its id (eos included)."""
        with self.gen._lock:
            if self.done:
                raise RuntimeError(f"this answer is finished ({self.finish_reason}); call text()")
            try:
                if self._logits is None:
                    self._prefill()
                elif self._pending is not None:
                    self._feed(self._pending)
                    self._pending = None
                token = self._sample()
            except BaseException:
                self._finish("error")
                raise
            return token

    def next_text(self) -> str:
        """`generate_next_token()`, then the text it added to the answer: "" while a character
        is still incomplete, and at eos. What streaming hosts send."""
        self.generate_next_token()
        text = self.gen.prompts.decode(self.tokens) if self.tokens else ""
        new = text[len(self._streamed) :] if len(text) > len(self._streamed) else ""
        self._streamed = text
        return new

    def append_tokens(self, ids) -> None:
        """Feed token ids after the answer so far (e.g. a follow-up turn); the next token is
        sampled after them. Each id is one decode step into this job's cache."""
        ids = [checks.integer("token id", t, 0, self.gen.embeddings.shape[0] - 1) for t in ids]
        with self.gen._lock:
            if self.done:
                raise RuntimeError(f"this answer is finished ({self.finish_reason})")
            if self._logits is None:
                self._prefill()
            for token in ([self._pending] if self._pending is not None else []) + ids:
                if self._position >= self.capacity:
                    raise UserError(
                        f"the KV cache is full ({self.capacity} rows); append fewer tokens"
                    )
                self._feed(token)
            self._pending = None

    def result(self) -> str:
        while not self.done:
            self.generate_next_token()
        return self.text()

    def cancel(self) -> None:
        with self.gen._lock:
            if not self.done:
                self._finish("cancelled")

    # steps ----------------------------------------------------------------------------------
    def _prefill(self) -> None:
        gen, b = self.gen, self.gen.config["backbone"]
        vision = gen.session("vision")
        image_embeds = vision.to_host(vision.run(self.feeds)["image_embeds"]).astype(np.float32)
        gen.release("vision")
        ids = gen.prompts.chat_ids(self.question, image_embeds.shape[0])
        limit = graph_spec(gen.manifest, "prefill").dim("seq").max
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
        spec = graph_spec(gen.manifest, "decode")
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
        checks.finite("the answer's logits", self._logits, "check the engine folder")
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
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        self.gen.release("decode")
        self.gen._job_finished(self)


def stream_text(job: TokenJob, stream: Callable[[str], None] | None = None) -> str:
    """Run a token job to its end; `stream` receives the text as it grows. If anything raises
    (a stream callback that stops because its client went away), the job is cancelled."""
    try:
        while not job.done:
            if stream is None:
                job.generate_next_token()  # no text until the end: nothing decoded per token
            elif new := job.next_text():
                stream(new)
    except BaseException:
        job.cancel()
        raise
    return job.text()
