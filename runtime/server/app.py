"""The FastAPI app: OpenAI-compatible images and chat, a job API, health and Prometheus metrics.

`create_app(ServerConfig(...))` opens the engine folder in the background at startup, warms it
up (one short generation, which also computes the decoder's negative features) and only then
answers ready. Every response carries `x-replica` (this process, or the Ray replica serving it).
Errors are OpenAI-shaped (`protocol.ApiError`); user errors are 400, a full queue 429 and a
server that is not ready (or shutting down) 503, both with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.params import SETTINGS
from runtime.server import protocol
from runtime.server.metrics import Metrics
from runtime.server.protocol import ApiError
from runtime.server.scheduler import Cancelled, ChatTask, Engine, EngineClosed, ImageTask, QueueFull

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a waiting request checks that its client is still there
MAX_JOBS_KEPT = 256


@dataclass(frozen=True)
class ServerConfig:
    engines: Path
    backend: str = "onnxruntime"
    device: str | None = None
    threads: int | None = None
    max_batch: int | None = None  # default: the graphs' batch limit
    max_running: int | None = None  # default: max_batch
    max_queue: int = 64
    allow_remote_images: bool = False
    model_name: str | None = None  # default: blip3o-<variant>-<precision>
    replica: str | None = None  # the x-replica header; default host:pid
    warmup: bool = True


class State:
    """What one app holds: the Generator, its engine, the job table, metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.gen = None
        self.model = config.model_name or "blip3o"
        self.image_size = 0
        self.ready = False
        self.failure: str | None = None
        self.replica = config.replica or f"{socket.gethostname()}:{os.getpid()}"
        self.jobs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.idempotency: dict[str, tuple[str, str]] = {}
        self.latency_ema = 1.0

    def start(self) -> None:
        """Open the folder, start the engine, warm up (on a thread: `live` answers meanwhile)."""
        try:
            from runtime.generator import Generator

            c = self.config
            options = {"threads": c.threads} if c.threads and c.backend == "onnxruntime" else None
            self.gen = Generator.from_dir(
                c.engines, backend=c.backend, device=c.device, session_options=options
            )
            m = self.gen.manifest
            self.model = c.model_name or f"blip3o-{m['variant']}-{m['precision']}"
            self.image_size = int(m["sampler"]["image_size"])
            self.engine = Engine(
                self.gen,
                max_batch=c.max_batch,
                max_running=c.max_running,
                max_queue=c.max_queue,
                metrics=self.metrics,
            )
            if c.warmup:
                task = ImageTask(self.gen.start("warm-up", seed=0, steps=1, decoder_steps=1))
                self.engine.submit(task)
                task.wait()
                if task.status != "succeeded":
                    raise RuntimeError(f"warm-up failed: {task.error}")
            self.ready = True
            log.info("ready: %s (%s)", self.model, c.engines)
        except Exception as err:
            self.failure = " ".join(f"{type(err).__name__}: {err}".split())
            log.error("the server could not start: %s", self.failure)

    def retry_after(self) -> int:
        e = self.engine
        if e is None:
            return 5
        waiting = e.queue_depth() / max(e.max_running, 1)
        return max(1, math.ceil(self.latency_ema * max(waiting, 1)))

    def observe(self, seconds: float) -> None:
        self.latency_ema = 0.8 * self.latency_ema + 0.2 * seconds

    def submit(self, task) -> None:
        if not self.ready or self.engine is None:
            self.metrics.rejections.labels("not_ready").inc()
            raise ApiError(
                503,
                self.failure or "the server is starting; retry shortly",
                type="server_error",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        try:
            self.engine.submit(task)
        except QueueFull as err:
            self.metrics.rejections.labels("queue_full").inc()
            raise ApiError(
                429,
                f"the server is busy ({err}); retry later",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            ) from err
        except EngineClosed as err:
            self.metrics.rejections.labels("shutting_down").inc()
            raise ApiError(
                503,
                str(err),
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": "5"},
            ) from err

    def remember_job(self, job: dict) -> None:
        self.jobs[job["id"]] = job
        while len(self.jobs) > MAX_JOBS_KEPT:
            old_id, old = next(iter(self.jobs.items()))
            if not old["task"].done:
                break
            self.jobs.pop(old_id)


class ReplicaHeader:
    """Pure ASGI middleware adding `x-replica` (Starlette's BaseHTTPMiddleware would hide the
    client's disconnect from `request.is_disconnected()`)."""

    def __init__(self, app, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-replica", self.state.replica.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _bridge(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """An engine-thread callback that hands events to a request's asyncio queue."""

    def on_event(kind, task, payload):
        loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    return on_event


async def next_event(request: Request, queue: asyncio.Queue, task):
    """The next engine event for `task`; cancels the task if the client went away."""
    while True:
        if await request.is_disconnected():  # cheap: it does not wait
            task.cancel()
            raise Cancelled("the client disconnected")
        try:
            return await asyncio.wait_for(queue.get(), POLL_S)
        except asyncio.TimeoutError:
            pass


def create_app(config: ServerConfig, *, state: State | None = None, start: bool = True) -> FastAPI:
    """The app; `start` opens the folder on a thread at startup (`False`: `state` is started)."""
    state = state or State(config)

    async def lifespan(app):
        if start:
            threading.Thread(target=state.start, name="blip3o-startup", daemon=True).start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.close)
        if state.gen is not None:
            state.gen.close()

    app = FastAPI(title="blip3o-edge", lifespan=lifespan)
    app.state.blip3o = state

    app.add_middleware(ReplicaHeader, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(
            ApiError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where or None)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return error_response(
            ApiError(err.status_code, str(err.detail), type=kind, headers=dict(err.headers or {}))
        )

    # health, models, metrics ----------------------------------------------------------------
    def live():
        engine_ok = state.engine is None or state.engine._thread.is_alive()
        if state.failure or not engine_ok:
            return JSONResponse(
                {"status": "failed", "reason": state.failure or "engine stopped"}, status_code=503
            )
        return {"status": "ok"}

    app.get("/health")(live)
    app.get("/v1/health/live")(live)

    @app.get("/v1/health/ready")
    def ready():
        if state.ready:
            return {"status": "ready", "model": state.model}
        return JSONResponse(
            {"status": "not ready", "reason": state.failure or "starting"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [
                {"id": state.model, "object": "model", "created": 0, "owned_by": "blip3o-edge"}
            ],
        }

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # images ---------------------------------------------------------------------------------
    def image_task(fields: dict) -> tuple[ImageTask, int]:
        if not state.ready:
            state.submit(None)  # raises the 503
        try:
            settings = {k: fields[k] for k in SETTINGS}
            job = state.gen.start(fields["prompt"], **settings)  # validated, not yet run
        except Exception as err:
            raise protocol.api_error(err) from err
        tokens = len(state.gen.prompts.generation_ids(job.prompt))
        return ImageTask(job, partial_images=fields["partial_images"]), tokens

    async def read_image_fields(request: Request) -> dict:
        body = protocol.parse_body(await request.body())
        return protocol.image_request(
            body, model=state.model, image_size=state.image_size or 0, defaults={}
        )

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        start = time.perf_counter()
        status = "error"
        try:
            fields = await read_image_fields(request)
            task, tokens = image_task(fields)
            queue: asyncio.Queue = asyncio.Queue()
            task.on_event = _bridge(asyncio.get_running_loop(), queue)
            state.submit(task)
            if fields["stream"]:
                status = "stream"
                return await stream_images(request, task, queue, fields, tokens, start)
            while True:
                kind, _ = await next_event(request, queue, task)
                if kind == "done":
                    break
            if task.status != "succeeded":
                raise protocol.api_error(task.error)
            status = "ok"
            state.observe(time.perf_counter() - start)
            return protocol.images_body(
                task.images, created=int(task.created), size=fields["size"], prompt_tokens=tokens
            )
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
            raise protocol.api_error(task.error)

        async def events():
            status = "error"
            kind, payload = first
            try:
                while True:
                    if kind == "partial":
                        index, images = payload
                        for im in images:
                            yield protocol.sse(
                                protocol.image_event(
                                    "partial_image",
                                    im,
                                    size=fields["size"],
                                    index=index,
                                    prompt_tokens=tokens,
                                ),
                                "image_generation.partial_image",
                            )
                    elif kind == "done":
                        break
                    kind, payload = await next_event(request, queue, task)
                if task.status == "succeeded":
                    for im in task.images:
                        yield protocol.sse(
                            protocol.image_event(
                                "completed",
                                im,
                                size=fields["size"],
                                index=None,
                                prompt_tokens=tokens,
                            ),
                            "image_generation.completed",
                        )
                    status = "ok"
                    state.observe(time.perf_counter() - start)
                else:
                    yield protocol.sse(protocol.api_error(task.error).body(), "error")
            except (Cancelled, asyncio.CancelledError, GeneratorExit):
                task.cancel()
                status = "cancelled"
                raise
            finally:
                state.metrics.record("images_stream", status, start)

        return StreamingResponse(events(), media_type="text/event-stream")

    # jobs -----------------------------------------------------------------------------------
    def job_view(job: dict) -> dict:
        task: ImageTask = job["task"]
        view = {
            "id": job["id"],
            "object": "image.job",
            "created": int(task.created),
            "status": task.status,
            "stage": task.stage,
            "steps_done": task.steps_done,
            "steps_total": task.steps_total,
        }
        if task.status == "failed":
            view["error"] = protocol.api_error(task.error).body()["error"]
        return view

    def get_job(job_id: str) -> dict:
        if job_id not in state.jobs:
            raise ApiError(404, f"no image job {job_id!r}", param="id", code="job_not_found")
        return state.jobs[job_id]

    @app.post("/v1/images/jobs", status_code=202)
    async def create_job(request: Request):
        raw = await request.body()
        key = request.headers.get("idempotency-key")
        digest = hashlib.sha256(raw).hexdigest()
        if key is not None and key in state.idempotency:
            seen_digest, job_id = state.idempotency[key]
            if seen_digest != digest:
                raise ApiError(
                    409,
                    f"Idempotency-Key {key!r} was used with a different body",
                    code="idempotency_conflict",
                )
            if job_id in state.jobs:
                return JSONResponse(job_view(state.jobs[job_id]), status_code=202)
        fields = protocol.image_request(
            protocol.parse_body(raw),
            model=state.model,
            image_size=state.image_size or 0,
            defaults={},
        )
        if fields["stream"]:
            raise ApiError(
                400, "stream is not supported on the job API; poll the job", param="stream"
            )
        task, tokens = image_task(fields)
        state.submit(task)
        job = {"id": protocol.new_id("imgjob"), "task": task, "fields": fields, "tokens": tokens}
        state.remember_job(job)
        if key is not None:
            state.idempotency[key] = (digest, job["id"])
        return JSONResponse(
            job_view(job), status_code=202, headers={"Location": f"/v1/images/jobs/{job['id']}"}
        )

    @app.get("/v1/images/jobs/{job_id}")
    def job_status(job_id: str):
        return job_view(get_job(job_id))

    @app.get("/v1/images/jobs/{job_id}/content")
    def job_content(job_id: str):
        job = get_job(job_id)
        task: ImageTask = job["task"]
        if task.status == "succeeded":
            return protocol.images_body(
                task.images,
                created=int(task.created),
                size=job["fields"]["size"],
                prompt_tokens=job["tokens"],
            )
        if task.status == "failed":
            raise protocol.api_error(task.error)
        if task.status == "cancelled":
            raise ApiError(409, f"image job {job_id!r} was cancelled", code="job_cancelled")
        raise ApiError(
            409,
            f"image job {job_id!r} is {task.status} ({task.stage}, "
            f"{task.steps_done}/{task.steps_total} steps)",
            code="job_not_done",
            headers={"Retry-After": "1"},
        )

    @app.post("/v1/images/jobs/{job_id}/cancel")
    def job_cancel(job_id: str):
        job = get_job(job_id)
        job["task"].cancel()
        return job_view(job)

    # chat -----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        start = time.perf_counter()
        status = "error"
        try:
            body = protocol.parse_body(await request.body())
            fields = protocol.chat_request(
                body, model=state.model, allow_remote=state.config.allow_remote_images
            )
            image = await asyncio.to_thread(
                protocol.load_image_url, fields["url"], allow_remote=fields["allow_remote"]
            )
            queue: asyncio.Queue = asyncio.Queue()
            task = ChatTask(image, fields["question"], fields["options"])
            task.on_event = _bridge(asyncio.get_running_loop(), queue)
            state.submit(task)
            created, cid = int(time.time()), protocol.new_id("chatcmpl")
            if fields["stream"]:
                status = "stream"
                return StreamingResponse(
                    stream_chat(request, task, queue, fields, created, cid, start),
                    media_type="text/event-stream",
                )
            while (await next_event(request, queue, task))[0] != "done":
                pass
            if task.status != "succeeded":
                raise protocol.api_error(task.error)
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
                yield protocol.sse(protocol.api_error(task.error).body(), "error")
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
            task.cancel()
            status = "cancelled"
            raise
        finally:
            state.metrics.record("chat_stream", status, start)

    return app
