"""`POST /v1/chat/completions`: one user message about one image, answered by a token job on the
scheduler thread (plain, or streamed as `chat.completion.chunk` events ending in `[DONE]`)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from runtime.server import contract, models, protocol
from runtime.server.contract import ChatCompletion, responses
from runtime.server.errors import ApiError, api_error
from runtime.server.scheduler import Cancelled, ChatTask
from runtime.server.state import State
from runtime.server.streams import bridge, guarded, next_event


def routes(state: State) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/chat/completions",
        operation_id="createChatCompletion",
        summary="Answer a question about one image (OpenAI's chat API; SSE when stream is true)",
        responses=responses(400, 404, 413, 422, 429, 500, 503, ok=ChatCompletion, stream=True),
        openapi_extra=contract.request_body("ChatRequest"),
    )
    async def chat(request: Request):
        start = time.perf_counter()
        status = "error"
        try:
            req = models.parse(state.chat_model, await request.body())
            state.check_ready()
            fields = protocol.chat_fields(
                req, model=state.model, allow_remote=state.config.allow_remote_images
            )
            image = await asyncio.to_thread(
                protocol.load_image_url, fields["url"], allow_remote=fields["allow_remote"]
            )
            protocol.check_question(fields["question"])
            queue: asyncio.Queue = asyncio.Queue()
            task = ChatTask(image, fields["question"], fields["options"])
            task.on_event = bridge(asyncio.get_running_loop(), queue)
            state.submit(task)
            created, cid = int(time.time()), protocol.new_id("chatcmpl")
            if fields["stream"]:
                status = "stream"
                events = stream_chat(request, task, queue, fields, created, cid, start)
                return StreamingResponse(
                    guarded(events, task, "chat"), media_type="text/event-stream"
                )
            while (await next_event(request, queue, task))[0] != "done":
                pass
            if task.status != "succeeded":
                raise api_error(task.error)
            status = "ok"
            return protocol.chat_body(
                task.result, model=state.model, created=created, completion_id=cid
            )
        except Cancelled:
            status = "cancelled"
            return Response(status_code=499)
        except ApiError as err:
            status = str(err.status)
            raise
        finally:
            if status != "stream":
                state.metrics.record("chat", status, start)

    async def stream_chat(request, task, queue, fields, created, cid, start):
        ids = {"model": state.model, "created": created, "completion_id": cid}
        status = "error"
        try:
            yield protocol.sse(
                protocol.chat_chunk(**ids, delta={"role": "assistant", "content": ""})
            )
            while True:
                kind, text = await next_event(request, queue, task)
                if kind == "done":
                    break
                yield protocol.sse(protocol.chat_chunk(**ids, delta={"content": text}))
            if task.status != "succeeded":
                yield protocol.sse(api_error(task.error).body(), "error")
            else:
                answer = task.result
                yield protocol.sse(protocol.chat_chunk(**ids, finish_reason=answer.finish_reason))
                if fields["include_usage"]:
                    yield protocol.sse(
                        protocol.chat_chunk(**ids, usage=protocol.chat_usage(answer))
                    )
                status = "ok"
            yield protocol.sse("[DONE]")
        except (Cancelled, asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            state.metrics.record("chat_stream", status, start)

    return router
