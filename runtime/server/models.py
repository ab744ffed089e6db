"""The HTTP API's request and response models: the server's contract (`/openapi.json`) and its
request parser.

The sampling fields of the request models are derived from the params dataclasses
(`runtime.params.GeneratorParams`, `AnswerParams`): each field's kind gives its JSON type, its
range or choices and help give the schema's bounds and description. The models check only JSON
types (strictly: `"3"` is not an integer, `true` is not a number); values are the params
objects' to judge, so a bad value is their one message, renamed to the API's field
(`num_inference_steps must be in [1, 1000], got 0`). A params field the API does not name is
either mapped in `IMAGE_FIELDS` / `CHAT_FIELDS` or listed in `NOT_EXPOSED` with the reason
(a test checks every field is one or the other).

`parse(model, raw)` is the one request parser: any body that is not UTF-8 JSON (invalid
syntax, NaN, an integer past Python's digit limit, nesting deeper than `MAX_DEPTH`), not an
object, or not of the model's types, is an `ApiError` 400 naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    create_model,
)

from runtime.params import AnswerParams, GeneratorParams, field_info
from runtime.server.errors import ApiError

MAX_DEPTH = 32  # JSON nesting: the deepest request (a chat part's image_url) is 6
MAX_PARTIAL_IMAGES = 3
PROMPT = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"  # what runtime.validate.text takes (Unicode, too)

# API field -> params field, for the API names that differ (OpenAI's / vLLM-omni's); the other
# params fields keep their names in the API.
IMAGE_FIELDS = {
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "decoder_num_inference_steps": "decoder_steps",
    "decoder_guidance_scale": "decoder_guidance",
    "n": "num_images",
}
CHAT_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}
# params fields the API does not take, with the reason (none today).
NOT_EXPOSED: dict[type, dict[str, str]] = {GeneratorParams: {}, AnswerParams: {}}
# Chat defaults that differ from AnswerParams' (the API's: OpenAI's usual limit).
CHAT_DEFAULTS = {"max_new_tokens": 128}


def api_names(cls: type, renamed: dict[str, str]) -> dict[str, str]:
    """API field -> params field for every exposed field of a params class."""
    inverse = {p: a for a, p in renamed.items()}
    out = {}
    for name in field_info(cls):
        if name in NOT_EXPOSED[cls]:
            continue
        out[inverse.get(name, name)] = name
    out.update({a: p for a, p in renamed.items() if p in field_info(cls)})
    return out


def _json_type(info: dict, limits: dict | None = None) -> dict:
    """The JSON schema of one params field (its range narrowed by `limits`: the folder's)."""
    kind = info["kind"]
    if kind is str:
        schema: dict = {"type": "string"}
        if info.get("choices"):
            schema["enum"] = list(info["choices"])
    else:
        low, high = info["range"]
        schema = {"type": "integer" if kind is int else "number", "minimum": low, "maximum": high}
    schema.update(limits or {})
    return schema


def _integral(value):
    """JSON's integers: `2.0` is one (JSON Schema's `integer` holds it), `2.5` and `true` not."""
    if type(value) is float and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[StrictInt, BeforeValidator(_integral)]


def _param_field(info: dict, description: str, limits: dict | None = None):
    """A model field for a params field: strict JSON type, nullable (null: the default)."""
    strict = {int: Integer, float: StrictFloat | StrictInt, str: StrictStr}[info["kind"]]
    schema = {"anyOf": [_json_type(info, limits), {"type": "null"}]}
    return (
        Annotated[strict | None, WithJsonSchema(schema)],
        Field(default=None, description=description),
    )


class _Model(BaseModel):
    # unknown fields are ignored, as OpenAI-compatible servers do (clients send extras)
    model_config = ConfigDict(extra="ignore")


def image_request_model(
    *,
    image_size: int | None = None,
    max_images: int | None = None,
    presets=(),
    max_steps=None,
    model: str | None = None,
    job: bool = False,
) -> type[BaseModel]:
    """The images request (`/v1/images/generations`; with `job`, `/v1/images/jobs`, which
    does not stream): OpenAI's fields plus the sampler fields of `GeneratorParams` (vLLM-omni's
    names where they differ), bounded by the served folder where it is known (model id, size,
    batch, presets) and by `max_steps`."""
    info = field_info(GeneratorParams)
    limits: dict[str, dict] = {"num_images": {"minimum": 1}}
    if max_images:
        limits["num_images"]["maximum"] = max_images
    if presets:
        limits["preset"] = {"enum": sorted(presets)}
    if max_steps:
        limits["steps"] = limits["decoder_steps"] = {"maximum": max_steps}
    fields: dict[str, Any] = {}
    for api, name in api_names(GeneratorParams, IMAGE_FIELDS).items():
        help = info[name]["help"]
        if name == "seed":
            help += "; left out, the server picks one and returns it with each image"
        elif name == "num_images":
            help = "images for the prompt, drawn as one batch from one seed"
        elif info[name]["default"] is None:
            help += " (default: the served folder's)"
        fields[api] = _param_field(info[name], help, limits.get(name))
    sizes = ["auto"] + ([f"{image_size}x{image_size}"] if image_size else [])
    stream = {"enum": [False, None]} if job else {"anyOf": [{"type": "boolean"}, {"type": "null"}]}
    return create_model(
        "ImageJobRequest" if job else "ImageRequest",
        __base__=_Model,
        model=served_model(model),
        prompt=(
            Annotated[StrictStr, WithJsonSchema({"type": "string", "pattern": PROMPT})],
            Field(description="what to draw (not empty, no NUL)"),
        ),
        size=(
            Annotated[StrictStr | None, WithJsonSchema({"enum": [*sizes, None]})],
            Field(None, description="the served folder's size, or auto"),
        ),
        response_format=(
            Annotated[StrictStr | None, WithJsonSchema({"enum": ["b64_json", None]})],
            Field(None, description="b64_json only"),
        ),
        output_format=(
            Annotated[StrictStr | None, WithJsonSchema({"enum": ["png", None]})],
            Field(None, description="png only"),
        ),
        stream=(
            Annotated[StrictBool | None, WithJsonSchema(stream)],
            Field(None, description="server-sent events" + (" (not on jobs)" if job else "")),
        ),
        partial_images=(
            Annotated[
                Integer | None,
                WithJsonSchema(
                    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 3}, {"type": "null"}]}
                ),
            ],
            Field(None, description="previews streamed before the image (0-3)"),
        ),
        **fields,
    )


class ImageURL(_Model):
    url: StrictStr = Field(description="a data: URL (base64), or http(s) when allowed")
    detail: StrictStr | None = None


class ContentPart(_Model):
    type: Literal["text", "image_url"]
    text: StrictStr | None = None
    image_url: ImageURL | StrictStr | None = None


class Message(_Model):
    role: Literal["system", "developer", "user"]  # one user turn; multi-turn is not served
    content: StrictStr | list[ContentPart] | None = None


class StreamOptions(_Model):
    include_usage: StrictBool | None = None


# exactly one user message (system / developer messages beside it are ignored)
ONE_USER = {
    "contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]},
    "minContains": 1,
    "maxContains": 1,
}


def served_model(model: str | None):
    """The `model` field: the served model's id, or left out (another id is a 404)."""
    schema = {"enum": [model, None]} if model else {"anyOf": [{"type": "string"}, {"type": "null"}]}
    return (
        Annotated[StrictStr | None, WithJsonSchema(schema)],
        Field(None, description="the served model id (or left out)"),
    )


def chat_request_model(model: str | None = None) -> type[BaseModel]:
    """The chat request: OpenAI's fields plus the sampling fields of `AnswerParams`."""
    info = field_info(AnswerParams)
    fields: dict[str, Any] = {}
    for api, name in api_names(AnswerParams, CHAT_FIELDS).items():
        help = info[name]["help"]
        if name in CHAT_DEFAULTS:
            help += f" (default {CHAT_DEFAULTS[name]})"
        fields[api] = _param_field(info[name], help)
    return create_model(
        "ChatRequest",
        __base__=_Model,
        model=served_model(model),
        messages=(
            list[Message],
            Field(
                min_length=1,
                description="one user message with one image (system ignored)",
                json_schema_extra=ONE_USER,
            ),
        ),
        stream=(StrictBool | None, None),
        stream_options=(StreamOptions | None, None),
        # refused with their own message when set (one answer, no stop sequences)
        n=(Annotated[Any, WithJsonSchema({"enum": [1, None]})], None),
        stop=(Annotated[Any, WithJsonSchema({"type": "null"})], None),
        **fields,
    )


# ---- parsing -------------------------------------------------------------------------------
def _constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _depth(value) -> int:
    """The nesting depth of parsed JSON, iteratively (no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
            items = node.values() if isinstance(node, dict) else node
            stack.extend((x, depth + 1) for x in items)
    return deepest


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object, or an `ApiError` 400 saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        reason = f"{err.reason} at byte {err.start}"
        raise ApiError(400, f"the request body is not UTF-8 ({reason})") from None
    try:
        body = json.loads(text, parse_constant=_constant)
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, NaN, an integer past the digit limit
        reason = " ".join(str(err).split())[:160]
        raise ApiError(400, f"the request body is not JSON: {reason}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if _depth(body) > MAX_DEPTH:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels")
    return body


def shown(value) -> str:
    """A request value for an error message: JSON, short, ASCII (survives lone surrogates)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(type(value).__name__)
    return text if len(text) <= 80 else text[:77] + "..."


_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "a boolean",
    "list_type": "a list",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
    "none_required": "null",
    "too_short": "a non-empty list",
}


def _where(loc: tuple, known: set[str]) -> str:
    """A pydantic location as the API's path (`messages[0].content[1].image_url.url`), without
    the union members' tags pydantic adds."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in known:
            out += f".{part}" if out else part
    return out


def _known(model: type[BaseModel]) -> set[str]:
    names, todo = set(), [model, ImageURL, ContentPart, Message, StreamOptions]
    for m in todo:
        names |= set(m.model_fields)
    return names


def validation_error(err: ValidationError, model: type[BaseModel]) -> ApiError:
    """One pydantic error (the most specific) as a 400 naming the API field."""
    errors = err.errors(include_url=False)
    first = max(errors, key=lambda e: len(e["loc"]))
    where = _where(first["loc"], _known(model)) or "the request body"
    param = where.split(".")[0].split("[")[0] if where != "the request body" else None
    if first["type"] == "missing":
        return ApiError(400, f"{where} is required", param=param)
    what = _WORDS.get(first["type"])
    message = f"{where} must be {what}" if what else f"{where}: {first['msg']}"
    return ApiError(400, f"{message}, got {shown(first.get('input'))}", param=param)


def parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    """A request body as `model`, or an `ApiError` 400 naming what is wrong."""
    body = parse_json(raw)
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err, model) from None
