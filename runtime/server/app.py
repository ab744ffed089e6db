"""The FastAPI app: OpenAI-compatible images and chat, a job API, health and Prometheus metrics.

`create_app(ServerConfig(...))` assembles the routes (`images`, `jobs`, `chat`, `health`) over one
`State` (`state`: the Generator, its scheduler, admission) behind the `errors.Guard` middleware
(`x-replica` on every response, the body limit, a JSON 500 for anything unexpected). The
OpenAPI schema at `/openapi.json` is the server's contract: every request body (models derived
from the params dataclasses, `models`), every answer's status, model and content type.
"""

from __future__ import annotations

import asyncio
import threading

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from runtime.server import chat, errors, health, images, jobs
from runtime.server.errors import JsonResponse
from runtime.server.state import ServerConfig, State

__all__ = ["ServerConfig", "State", "create_app"]


def create_app(config: ServerConfig, *, state: State | None = None, start: bool = True) -> FastAPI:
    """The app; `start` opens the folder on a thread at startup (`False`: `state` is started)."""
    state = state or State(config)

    async def lifespan(app):
        if start:
            threading.Thread(target=state.start, name="blip3o-startup", daemon=True).start()
        yield
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.close)
        if state.gen is not None:
            state.gen.close()

    app = FastAPI(title="blip3o-edge", lifespan=lifespan, default_response_class=JsonResponse)
    app.state.blip3o = state
    app.add_middleware(errors.Guard, state=state)
    errors.install(app)
    for module in (images, jobs, chat, health):
        app.include_router(module.routes(state))
    app.openapi = lambda: contract(app, state)
    return app


def contract(app: FastAPI, state: State) -> dict:
    """The OpenAPI schema: FastAPI's, plus the request models the routes parse themselves, less
    the 422 FastAPI documents for parameters it would validate (its errors are our 400s)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=_version(), routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (state.image_model, state.job_model, state.chat_model):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        for path in schema["paths"].values():
            for operation in path.values():
                answers = operation.get("responses", {})
                if "HTTPValidationError" in str(answers.get("422", "")):
                    answers.pop("422")
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _version() -> str:
    from runtime import __version__

    return __version__
