"""`POST /v1/images/generations`: OpenAI's images API (plain, or streamed as server-sent events
with partial images), over the scheduler. Every image says the seed it was drawn with."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from runtime.errors import ResultError, UserError
from runtime.server import contract, models, protocol
from runtime.server.contract import ImagesResponse, responses
from runtime.server.errors import ApiError, api_error
from runtime.server.models import IMAGE_FIELDS
from runtime.server.scheduler import Cancelled, ImageTask
from runtime.server.state import State
from runtime.server.streams import bridge, guarded, next_event

STEP_FIELDS = {v: k for k, v in IMAGE_FIELDS.items() if v in ("steps", "decoder_steps")}


def image_task(state: State, raw: bytes, model=None) -> tuple[ImageTask, dict, int]:
    """A validated, not yet queued image task from a request body (`model`: the request
    model, default the images one): (task, fields, prompt tokens). Every bad value is an
    `ApiError` (400 naming the API field, 404 model, 503)."""
    req = models.parse(model or state.image_model, raw)
    state.check_ready()
    fields = protocol.image_fields(req, model=state.model, image_size=state.image_size)
    try:
        settings = fields["settings"]
        params = state.gen.params(**settings)
        cap = state.config.max_steps
        for name, api in STEP_FIELDS.items() if cap else ():
            value = getattr(params, name)
            if value > cap and settings[name] is None:  # the folder's default: capped
                params = dataclasses.replace(params, **{name: cap})
            elif value > cap:
                raise ApiError(
                    400, f"{api} must be in [1, {cap}] on this server, got {value}", param=api
                )
        job = state.gen.start(fields["prompt"], params)  # validated, not yet run
        tokens = len(state.gen.prompts.generation_ids(job.prompt))
    except (UserError, ResultError) as err:
        raise api_error(err) from None
    return ImageTask(job, partial_images=fields["partial_images"]), fields, tokens


def _body(task: ImageTask, fields: dict, tokens: int) -> dict:
    return protocol.images_body(
        task.images,
        seed=task.seed,
        created=int(task.created),
        size=fields["size"],
        prompt_tokens=tokens,
    )


def routes(state: State) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/images/generations",
        operation_id="createImage",
        summary="Generate images (OpenAI's images API; SSE when stream is true)",
        responses=responses(400, 404, 413, 422, 429, 500, 503, ok=ImagesResponse, stream=True),
        openapi_extra=contract.request_body("ImageRequest"),
    )
    async def generations(request: Request):
        start = time.perf_counter()
        status = "error"
        try:
            task, fields, tokens = image_task(state, await request.body())
            queue: asyncio.Queue = asyncio.Queue()
            task.on_event = bridge(asyncio.get_running_loop(), queue)
            state.submit(task)
            if fields["stream"]:
                status = "stream"
                return await stream_images(request, task, queue, fields, tokens, start)
            while (await next_event(request, queue, task))[0] != "done":
                pass
            if task.status != "succeeded":
                raise api_error(task.error)
            status = "ok"
            state.observe(time.perf_counter() - start)
            return _body(task, fields, tokens)
        except Cancelled:
            status = "cancelled"
            return Response(status_code=499)
        except ApiError as err:
            status = str(err.status)
            raise
        finally:
            if status != "stream":
                state.metrics.record("images", status, start)

    async def stream_images(request, task, queue, fields, tokens, start):
        # hold the headers until the prefill passed, so a bad prompt is still a plain 400
        first = await next_event(request, queue, task)
        if first[0] == "done" and task.status != "succeeded":
            state.metrics.record("images", "400", start)
            raise api_error(task.error)
        seed = task.seed

        def event(kind: str, image, index=None) -> bytes:
            body = protocol.image_event(
                kind, image, size=fields["size"], index=index, prompt_tokens=tokens, seed=seed
            )
            return protocol.sse(body, f"image_generation.{kind}")

        async def events():
            status = "error"
            kind, payload = first
            try:
                while kind != "done":
                    if kind == "partial":
                        index, images = payload
                        for im in images:
                            yield event("partial_image", im, index)
                    kind, payload = await next_event(request, queue, task)
                if task.status == "succeeded":
                    for im in task.images:
                        yield event("completed", im)
                    status = "ok"
                    state.observe(time.perf_counter() - start)
                else:
                    yield protocol.sse(api_error(task.error).body(), "error")
            except (Cancelled, asyncio.CancelledError, GeneratorExit):
                status = "cancelled"
                raise
            finally:
                state.metrics.record("images_stream", status, start)

        return StreamingResponse(guarded(events(), task, "images"), media_type="text/event-stream")

    return router
