"""OpenAI-shaped requests' meaning and response bodies (plain dicts; no web framework here).

A request arrives as a validated model (`runtime.server.models`: JSON types checked); here its
values are read into the runtime's terms: `image_fields` and `chat_fields` check what only the
server knows (the served model and size, one image per chat) and build the params, whose own
checks judge the values (a `UserError`, renamed to the API field by `errors.api_error`). The
chat's image goes through the runtime's one image loader (`runtime.host.image.load_image`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time
import urllib.request
import uuid

from PIL import Image

from runtime import validate
from runtime.errors import UserError
from runtime.host.image import load_image
from runtime.params import AnswerParams, GeneratorParams
from runtime.server.errors import ApiError, api_error
from runtime.server.models import (
    CHAT_DEFAULTS,
    CHAT_FIELDS,
    IMAGE_FIELDS,
    MAX_PARTIAL_IMAGES,
    api_names,
)

MAX_IMAGE_BYTES = 20 << 20
SEED_BITS = 31  # a seed the server picks: in [0, 2**31), any client's integer type holds it


def check_model(name: str | None, model: str) -> None:
    if name is not None and name != model:
        raise ApiError(
            404,
            f"model {name!r} does not exist; this server serves {model!r}",
            param="model",
            code="model_not_found",
        )


def image_fields(req, *, model: str, image_size: int) -> dict:
    """The fields of a validated images request: `settings` (GeneratorParams' names; `seed`
    picked here when the request gave none) and the OpenAI options."""
    check_model(req.model, model)
    fmt = req.response_format or "b64_json"
    if fmt != "b64_json":
        raise ApiError(
            400,
            f"response_format {fmt!r} is not supported; use 'b64_json'",
            param="response_format",
        )
    size, allowed = req.size or "auto", f"{image_size}x{image_size}"
    if size not in ("auto", allowed):
        raise ApiError(
            400,
            f"size {size!r} is not served by this model; use {allowed!r} or 'auto'",
            param="size",
        )
    out_fmt = req.output_format or "png"
    if out_fmt != "png":
        raise ApiError(
            400, f"output_format {out_fmt!r} is not supported; use 'png'", param="output_format"
        )
    partial = 0 if req.partial_images is None else req.partial_images
    if not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise ApiError(
            400,
            f"partial_images must be in [0, {MAX_PARTIAL_IMAGES}], got {partial}",
            param="partial_images",
        )
    settings = {
        name: getattr(req, api) for api, name in api_names(GeneratorParams, IMAGE_FIELDS).items()
    }
    if settings["num_images"] is None:
        settings["num_images"] = 1
    if settings["seed"] is None:
        settings["seed"] = secrets.randbits(SEED_BITS)
    return {
        "prompt": req.prompt,
        "settings": settings,
        "stream": bool(req.stream),
        "partial_images": partial,
        "size": allowed,
    }


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def images_body(images, *, seed: int, created: int, size: str, prompt_tokens: int) -> dict:
    return {
        "created": created,
        "data": [{"b64_json": png_b64(im), "seed": seed} for im in images],
        "output_format": "png",
        "size": size,
        "usage": image_usage(prompt_tokens),
    }


def image_usage(prompt_tokens: int) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt_tokens},
        "output_tokens": 0,
        "total_tokens": prompt_tokens,
    }


def image_event(
    kind: str, image, *, size: str, index: int | None, prompt_tokens: int, seed: int
) -> dict:
    event = {
        "type": f"image_generation.{kind}",
        "b64_json": png_b64(image),
        "created_at": int(time.time()),
        "size": size,
        "quality": "auto",
        "background": "opaque",
        "output_format": "png",
    }
    if kind == "partial_image":
        event["partial_image_index"] = index
    else:
        event["seed"] = seed
        event["usage"] = image_usage(prompt_tokens)
    return event


def sse(data, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)  # ASCII: no raw surrogates
    return f"{head}data: {payload}\n\n".encode()


# chat --------------------------------------------------------------------------------------
def chat_fields(req, *, model: str, allow_remote: bool) -> dict:
    """The one image and question of a validated chat request, and its `AnswerParams`."""
    check_model(req.model, model)
    turns = [m for m in req.messages if m.role not in ("system", "developer")]
    if len(turns) != 1 or turns[0].role != "user":
        raise ApiError(
            400,
            "send one user message (with one image); multi-turn chat is not supported",
            param="messages",
        )
    content = turns[0].content
    if content is None:
        raise ApiError(400, "the user message has no content", param="messages")
    texts, urls = ([content], []) if isinstance(content, str) else ([], [])
    for part in [] if isinstance(content, str) else content:
        if part.type == "text":
            if part.text is None:
                raise ApiError(400, "a text part needs its text", param="messages")
            texts.append(part.text)
        else:
            url = part.image_url.url if hasattr(part.image_url, "url") else part.image_url
            if url is None:
                raise ApiError(400, "an image_url part needs its url", param="messages")
            urls.append(url)
    if len(urls) != 1:
        raise ApiError(
            400,
            f"this model answers about exactly one image; the message has {len(urls)}",
            param="messages",
        )
    if req.n not in (None, 1):
        raise ApiError(
            400, f"n {req.n!r} is not supported: one answer per request (use 1)", param="n"
        )
    if req.stop is not None:
        raise ApiError(400, "stop sequences are not supported", param="stop")
    limit_name = next(
        (a for a in ("max_completion_tokens", "max_tokens") if getattr(req, a) is not None),
        "max_tokens",
    )
    values = dict(CHAT_DEFAULTS)  # the rest left out: AnswerParams' defaults (greedy)
    for api, name in api_names(AnswerParams, CHAT_FIELDS).items():
        value = getattr(req, api)
        if value is not None and (name != "max_new_tokens" or api == limit_name):
            values[name] = value
    try:  # the runtime's own checks, here so a bad value is a plain 400 even when streaming
        options = AnswerParams(**values)
    except UserError as err:
        raise api_error(err, {"max_new_tokens": limit_name}) from None
    options_stream = req.stream_options
    return {
        "question": "\n".join(texts),
        "url": urls[0],
        "allow_remote": allow_remote,
        "options": options,
        "stream": bool(req.stream),
        "include_usage": bool(options_stream and options_stream.include_usage),
    }


def check_question(question: str) -> str:
    """The question's text, as the runtime takes it (not empty, valid Unicode), or a 400."""
    try:
        return validate.text("question", question)
    except UserError as err:
        raise ApiError(400, f"messages: {err}", param="messages") from None


def load_image_url(url: str, *, allow_remote: bool) -> Image.Image:
    """A data: URL (or, when enabled, an http(s) URL) as an RGB image through the runtime's one
    loader (`load_image`: every decoder failure is its `UserError`); `ApiError` 400 else."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise ApiError(
                400, "image data URLs must be base64 (data:image/png;base64,...)", param="messages"
            )
        if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise ApiError(400, f"the image is over {MAX_IMAGE_BYTES >> 20} MiB", param="messages")
        try:
            raw = base64.b64decode(data, validate=True)
        except (ValueError, binascii.Error) as err:
            raise ApiError(
                400, f"the image data URL is not valid base64: {err}", param="messages"
            ) from None
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ApiError(
                400,
                "remote image URLs are refused; send a data: URL, or start the server "
                "with --allow-remote-images",
                param="messages",
            )
        raw = _fetch(url)
    else:
        raise ApiError(
            400, f"image URL scheme of {url[:40]!r} is not supported; use data:", param="messages"
        )
    try:
        return load_image(raw, what="the image")
    except UserError as err:
        raise ApiError(400, str(err), param="messages") from None


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (http/https only)
            raw = response.read(MAX_IMAGE_BYTES + 1)
    except (OSError, ValueError) as err:  # ValueError: a URL urllib cannot parse
        raise ApiError(
            400, f"cannot fetch the image {url[:80]!r}: {err}", param="messages"
        ) from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ApiError(
            400, f"the image at {url[:80]!r} is over {MAX_IMAGE_BYTES >> 20} MiB", param="messages"
        )
    return raw


def chat_body(answer, *, model: str, created: int, completion_id: str) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": chat_usage(answer),
    }


def chat_usage(answer) -> dict:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def chat_chunk(*, model, created, completion_id, delta=None, finish_reason=None, usage=None):
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None and finish_reason is None
        else [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
