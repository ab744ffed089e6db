"""The server's answers as the OpenAPI contract documents them: the response models (the bodies
themselves are built in `protocol`), each route's status codes with their error model, the
`Retry-After` header of 429 / 503, the event-stream content type of streamed answers, and the
request bodies the routes parse themselves (`models.parse`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error or server_error")
    param: str | None = Field(description="the request field at fault")
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageData(BaseModel):
    b64_json: str = Field(description="the PNG, base64")
    seed: int = Field(
        description="the seed this image was drawn with: the request's, or the one the server "
        "picked when it gave none; the images of one request (n > 1) share it, as one noise "
        "draw for the whole batch (the same request with this seed gives the same images)"
    )


class ImageUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png"]
    size: str
    usage: ImageUsage


class ImageJob(BaseModel):
    id: str
    object: Literal["image.job"]
    created: int
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str
    steps_done: int
    steps_total: int
    error: ErrorDetail | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    reason: str | None = None
    model: str | None = None


ERRORS = {
    400: "a bad request: the message names the field (param) and the value",
    404: "an unknown model, job or route",
    409: "a conflict: the job is not done, was cancelled, or the Idempotency-Key was reused",
    413: "the request body is too large",
    422: "the result was not finite (NaN/inf): code result_not_finite",
    429: "the queue is full: retry after Retry-After seconds",
    500: "an internal error (logged on the server)",
    503: "not ready yet, or shutting down: retry after Retry-After seconds",
}
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
}
# One server-sent event (OpenAPI 3.1: an event stream's schema describes each event).
EVENT = {
    "type": "object",
    "description": "one server-sent event: image_generation.partial_image / .completed (their "
    "data: the image, its seed on completed), chat.completion.chunk events (no event name; the "
    "last data is [DONE]) or error (data: an error object; code replica_lost under Ray: retry)",
    "properties": {
        "event": {
            "enum": [
                "image_generation.partial_image",
                "image_generation.completed",
                "error",
            ]
        },
        "data": {"type": "string", "description": "the event's JSON (or [DONE])"},
    },
    "required": ["data"],
}
SSE = {"text/event-stream": {"schema": EVENT}}


def request_body(model_name: str) -> dict:
    """`openapi_extra` declaring a route's JSON body (the route parses it with `parse`, which
    reads any Content-Type as JSON, so `curl -d` works)."""
    schema = {"$ref": f"#/components/schemas/{model_name}"}
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


def responses(*codes: int, ok=None, ok_status: int = 200, stream: bool = False) -> dict:
    """FastAPI `responses` for a route: its answer model (and SSE), and its error codes."""
    out: dict = {}
    if ok is not None:
        out[ok_status] = {"model": ok}
        if stream:
            out[ok_status]["content"] = SSE
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": ERRORS[code]}
        if code in (429, 503):
            out[code]["headers"] = RETRY_AFTER
    return out
