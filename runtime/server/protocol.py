"""OpenAI-shaped request parsing and response bodies (plain dicts; no web framework here).

Request bodies are read as JSON objects and checked field by field, so a bad value is a 400 with
one message naming it (`ApiError`), never a framework's 422 list. Numeric generation fields go to
the runtime's own validation (`Generator.start`); its `UserError` names the runtime's argument,
which `api_error` renames to the API's field (`steps` -> `num_inference_steps`).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import urllib.request
import uuid

from PIL import Image

from runtime.errors import ResultError, UserError
from runtime.params import AnswerParams

MAX_IMAGE_BYTES = 20 << 20
MAX_IMAGE_PIXELS = 64_000_000
MAX_PARTIAL_IMAGES = 3
DEFAULT_MAX_TOKENS = 128

# runtime argument -> API field
API_NAMES = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "decoder_steps": "decoder_num_inference_steps",
    "decoder_guidance": "decoder_guidance_scale",
    "num_images": "n",
    "max_new_tokens": "max_tokens",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, " ".join(message.split()), type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def api_error(err: BaseException) -> ApiError:
    """The HTTP error for an exception out of the runtime or the engine."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, UserError):
        message = " ".join(str(err).split())
        first = message.split(" ", 1)[0]
        param = API_NAMES.get(first, first if re.fullmatch(r"[a-z_]+", first) else None)
        if first in API_NAMES:
            message = API_NAMES[first] + message[len(first) :]
        return ApiError(400, message, param=param)
    if isinstance(err, ResultError):
        return ApiError(422, str(err), type="invalid_request_error", code="result_not_finite")
    return ApiError(500, f"internal error: {type(err).__name__}", type="server_error")


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not JSON: {err}") from err
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _get(body: dict, name: str, kinds: tuple, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ApiError(400, f"{name} must be {names}, got {json.dumps(value)[:80]}", param=name)
    return value


def image_request(body: dict, *, model: str, image_size: int, defaults: dict) -> dict:
    """Validated fields of an images request; numeric ranges are checked by the runtime."""
    check_model(body, model)
    fmt = _get(body, "response_format", (str,), "b64_json")
    if fmt != "b64_json":
        raise ApiError(
            400,
            f"response_format {fmt!r} is not supported; use 'b64_json'",
            param="response_format",
        )
    size = _get(body, "size", (str,), "auto")
    allowed = f"{image_size}x{image_size}"
    if size not in ("auto", allowed):
        raise ApiError(
            400,
            f"size {size!r} is not served by this model; use {allowed!r} or 'auto'",
            param="size",
        )
    out_fmt = _get(body, "output_format", (str,), "png")
    if out_fmt != "png":
        raise ApiError(
            400, f"output_format {out_fmt!r} is not supported; use 'png'", param="output_format"
        )
    partial = _get(body, "partial_images", (int,), 0)
    if not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise ApiError(
            400,
            f"partial_images must be in [0, {MAX_PARTIAL_IMAGES}], got {partial}",
            param="partial_images",
        )
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", param="prompt")
    seed = body.get("seed")
    return {
        "prompt": prompt,
        "seed": int(time.time_ns() % (1 << 31)) if seed is None else seed,
        "steps": body.get("num_inference_steps"),
        "guidance": body.get("guidance_scale"),
        "decoder_steps": body.get("decoder_num_inference_steps"),
        "decoder_guidance": body.get("decoder_guidance_scale"),
        "num_images": body.get("n", 1),
        # our extension: the samplers (runtime.jobs.samplers) or a preset of the engine folder
        "sampler": body.get("sampler"),
        "decoder_sampler": body.get("decoder_sampler"),
        "preset": body.get("preset"),
        "stream": _get(body, "stream", (bool,), False),
        "partial_images": partial,
        "size": allowed,
    }


def check_model(body: dict, model: str) -> None:
    name = _get(body, "model", (str,))
    if name is not None and name != model:
        raise ApiError(
            404,
            f"model {name!r} does not exist; this server serves {model!r}",
            param="model",
            code="model_not_found",
        )


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def images_body(images, *, created: int, size: str, prompt_tokens: int) -> dict:
    return {
        "created": created,
        "data": [{"b64_json": png_b64(im)} for im in images],
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


def image_event(kind: str, image, *, size: str, index: int | None, prompt_tokens: int) -> dict:
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
        event["usage"] = image_usage(prompt_tokens)
    return event


def sse(data, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


# chat --------------------------------------------------------------------------------------
def _or(value, default):
    return default if value is None else value


def chat_request(body: dict, *, model: str, allow_remote: bool) -> dict:
    """The one image and question of a chat request, and its decoding options."""
    check_model(body, model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = [
        m
        for m in messages
        if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))
    ]
    if len(turns) != 1 or not isinstance(turns[0], dict) or turns[0].get("role") != "user":
        raise ApiError(
            400,
            "send one user message (with one image); multi-turn chat is not supported",
            param="messages",
        )
    content = turns[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ApiError(
            400, "messages[].content must be a string or a list of parts", param="messages"
        )
    texts, urls = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, "image_url.url must be a string", param="messages")
            urls.append(url)
        else:
            raise ApiError(
                400,
                f"unsupported content part type {kind!r}; use text or image_url",
                param="messages",
            )
    if len(urls) != 1:
        raise ApiError(
            400,
            f"this model answers about exactly one image; the message has {len(urls)}",
            param="messages",
        )
    if body.get("n") not in (None, 1):
        raise ApiError(
            400, f"n {body['n']!r} is not supported: one answer per request (use 1)", param="n"
        )
    if body.get("stop") is not None:
        raise ApiError(400, "stop sequences are not supported", param="stop")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    stream_options = _get(body, "stream_options", (dict,), {})
    try:  # the runtime's own checks, here so a bad value is a plain 400 even when streaming
        options = AnswerParams(
            max_new_tokens=DEFAULT_MAX_TOKENS if limit is None else limit,
            temperature=_or(body.get("temperature"), 0.0),  # left out: greedy
            top_p=_or(body.get("top_p"), 1.0),
            seed=_or(body.get("seed"), 0),
        )
    except UserError as err:
        raise api_error(err) from err
    return {
        "question": "\n".join(texts),
        "url": urls[0],
        "allow_remote": allow_remote,
        "options": options,
        "stream": _get(body, "stream", (bool,), False),
        "include_usage": bool(stream_options.get("include_usage")),
    }


def load_image_url(url: str, *, allow_remote: bool) -> Image.Image:
    """A data: URL (or, when enabled, an http(s) URL) as a loaded PIL image; `ApiError` else."""
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
        except ValueError as err:
            raise ApiError(
                400, f"the image data URL is not valid base64: {err}", param="messages"
            ) from err
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
        with Image.open(io.BytesIO(raw)) as f:
            if f.width * f.height > MAX_IMAGE_PIXELS:
                raise ApiError(
                    400,
                    f"the image is {f.width}x{f.height} px; at most "
                    f"{MAX_IMAGE_PIXELS} pixels are accepted",
                    param="messages",
                )
            f.load()
            return f.copy()
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise ApiError(400, f"cannot read the image: {err}", param="messages") from err


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (http/https only)
            raw = response.read(MAX_IMAGE_BYTES + 1)
    except OSError as err:
        raise ApiError(
            400, f"cannot fetch the image {url[:80]!r}: {err}", param="messages"
        ) from err
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
