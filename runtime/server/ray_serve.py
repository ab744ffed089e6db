"""Scale-out on Ray Serve: the same HTTP API over N replicas, one Generator each.

    python -m runtime serve --engines engines/tiny-fp32 --ray-replicas 2
    RAY_ADDRESS=ray://head:10001 python -m runtime serve --engines ... --ray-autoscale 1:8

Two deployments:

- `Replica` (N of them, a GPU each where the cluster has GPUs): opens the engine folder, warms
  up before it takes traffic, and runs the app of `runtime.server.app` in-process; `x-replica`
  names the Ray replica. Ray's backpressure applies here (`max_ongoing_requests`,
  `max_queued_requests`; a full queue is Ray's 503) and its autoscaling settings.
- `Front` (one, the HTTP ingress): forwards each HTTP request to a replica through a
  deployment handle (`relay.forward`). A replica that dies at any point before a plain answer
  is whole is retried on another one (the front collects the answer before sending it); an
  event stream is retried until its first event, and a replica that dies after that ends it
  with an `error` event (code `replica_lost`), never a broken connection.

The job API's state lives in the replica that accepted the job: under Ray with several replicas
a status poll may reach another replica (404); use the synchronous endpoints there.
"""

# No `from __future__ import annotations` here: FastAPI reads the Front's `request: Request`
# annotation at route definition, and `Request` is imported inside `build` (the extra is
# optional), so a string annotation would not resolve and FastAPI would take it for a query
# parameter (every request a 422).
import asyncio
import logging
import os
from dataclasses import dataclass, replace

from runtime.errors import UserError
from runtime.server import relay
from runtime.server.state import ServerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    max_ongoing_requests: int = 8
    max_queued_requests: int = 64
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    target_ongoing_requests: float = 2.0
    gpus_per_replica: float | None = None  # default: 1 where the cluster has GPUs

    @classmethod
    def from_args(cls, args) -> "RayOptions":
        autoscale = None
        if args.ray_autoscale:
            try:
                low, high = (int(x) for x in args.ray_autoscale.split(":"))
            except ValueError:
                raise UserError(f"--ray-autoscale {args.ray_autoscale!r}: use MIN:MAX") from None
            if not 0 <= low <= high or high < 1:
                raise UserError(f"--ray-autoscale {args.ray_autoscale!r}: need 0 <= MIN <= MAX")
            autoscale = (low, high)
        replicas = 1 if args.ray_replicas is None else args.ray_replicas
        if replicas < 1:
            raise UserError(f"--ray-replicas must be at least 1, got {replicas}")
        return cls(
            replicas=replicas,
            max_ongoing_requests=args.ray_max_ongoing,
            max_queued_requests=args.ray_max_queued,
            autoscale=autoscale,
            target_ongoing_requests=args.ray_target_ongoing,
        )

    def deployment_options(self, gpus: float) -> dict:
        options = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": 0, "num_gpus": gpus},
            "health_check_period_s": 2,
            "graceful_shutdown_timeout_s": 5,
        }
        if self.autoscale:
            low, high = self.autoscale
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "initial_replicas": max(low, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


async def call_asgi(app, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Run one HTTP request through an ASGI app in-process; yields `("start", status,
    headers)`, then `("body", bytes)` chunks as the app sends them (streams stay streams)."""
    messages: asyncio.Queue = asyncio.Queue()
    sent = asyncio.Event()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }

    async def receive():
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # until cancelled: the caller went away
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.create_task(messages.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if task.exception() is not None:
                    raise task.exception()
                return
            message = getter.result()
            if message["type"] == "http.response.start":
                yield ("start", message["status"], message.get("headers", []))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield ("body", message["body"])
                if not message.get("more_body"):
                    return
    finally:
        if not task.done():
            task.cancel()


def build(config: ServerConfig, options: RayOptions, gpus: float):
    """The bound Ray Serve application (Front -> Replica)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from ray import serve
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
    from ray.serve import exceptions as serve_exceptions

    from runtime.server.app import create_app
    from runtime.server.state import State

    @serve.deployment(**options.deployment_options(gpus))
    class Replica:
        def __init__(self, config: ServerConfig) -> None:
            ctx = serve.get_replica_context()
            name = getattr(getattr(ctx, "replica_id", None), "unique_id", None)
            name = name or getattr(ctx, "replica_tag", None) or f"pid{os.getpid()}"
            self.state = State(replace(config, replica=f"{ctx.deployment}#{name}"))
            self.state.start()  # opens the folder and warms up before taking traffic
            if not self.state.ready:
                raise RuntimeError(f"replica failed to start: {self.state.failure}")
            self.app = create_app(self.state.config, state=self.state, start=False)

        async def http(self, method, path, query, headers, body):
            async for item in call_asgi(self.app, method, path, query, headers, body):
                yield item

        def check_health(self) -> None:
            if not self.state.alive():
                raise RuntimeError("the scheduler thread stopped")

    front_app = FastAPI()
    lost = (
        RayActorError,  # ActorDiedError, ActorUnavailableError
        WorkerCrashedError,
        NodeDiedError,
        ObjectLostError,
        serve_exceptions.ReplicaUnavailableError,
    )

    @serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    @serve.ingress(front_app)
    class Front:
        def __init__(self, replicas) -> None:
            self.replicas = replicas.options(stream=True)

        @front_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        async def forward(self, path: str, request: Request):
            body = await request.body()
            headers = [(k.lower(), v) for k, v in request.headers.raw]
            query = request.url.query.encode()

            def call():
                return self.replicas.http.remote(request.method, "/" + path, query, headers, body)

            try:
                answer = await relay.forward(
                    call, lost=lost, busy=(serve_exceptions.BackPressureError,)
                )
            except Exception as err:  # a bug here: still one JSON answer, logged once
                log.error("forwarding %s /%s failed", request.method, path, exc_info=err)
                body = relay.error_body(f"internal error ({type(err).__name__})", "internal_error")
                return JSONResponse(body, status_code=500)
            if answer.stream is None:
                return Response(answer.body, status_code=answer.status, headers=answer.headers)
            return StreamingResponse(
                answer.stream, status_code=answer.status, headers=answer.headers
            )

    return Front.bind(Replica.bind(config))


def serve_on_ray(config: ServerConfig, options: RayOptions, *, host: str, port: int) -> int:
    """Start (or join, with RAY_ADDRESS) a Ray cluster and serve until interrupted."""
    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(config, options, gpus), name="blip3o", route_prefix="/", blocking=True)
    return 0
