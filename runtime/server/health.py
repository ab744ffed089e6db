"""Health, the model list and Prometheus metrics: `/health` and `/v1/health/live` (process and
scheduler thread up), `/v1/health/ready` (503 until the folder is open and warmed up),
`/v1/models`, `/metrics` (Prometheus' text format)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime.server.contract import RETRY_AFTER, Health, ModelList
from runtime.server.errors import JsonResponse
from runtime.server.state import State

HEALTH = {200: {"model": Health}, 503: {"model": Health, "description": "not up / not ready"}}
PROMETHEUS = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def routes(state: State) -> APIRouter:
    router = APIRouter()

    def live():
        if not state.alive():
            reason = state.failure or "the scheduler thread stopped"
            return JsonResponse({"status": "failed", "reason": reason}, status_code=503)
        return {"status": "ok"}

    router.get("/health", operation_id="health", responses=HEALTH, summary="Liveness")(live)
    router.get("/v1/health/live", operation_id="live", responses=HEALTH, summary="Liveness")(live)

    @router.get(
        "/v1/health/ready",
        operation_id="ready",
        responses={**HEALTH, 503: {**HEALTH[503], "headers": RETRY_AFTER}},
        summary="Readiness: the folder is open and warmed up",
    )
    def ready():
        if state.ready:
            return {"status": "ready", "model": state.model}
        return JsonResponse(
            {"status": "not ready", "reason": state.failure or "starting"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @router.get("/v1/models", operation_id="listModels", responses={200: {"model": ModelList}})
    def models():
        card = {"id": state.model, "object": "model", "created": 0, "owned_by": "blip3o-edge"}
        return {"object": "list", "data": [card]}

    @router.get("/metrics", operation_id="metrics", response_class=Response, responses=PROMETHEUS)
    def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
