"""The image job API: `POST /v1/images/jobs` (202, with `Idempotency-Key`), then poll its status,
fetch its content (with each image's seed) or cancel it. Jobs live in this server's memory (the
`MAX_JOBS_KEPT` most recent finished ones are kept)."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request

from runtime.server import contract, protocol
from runtime.server.contract import ImageJob, ImagesResponse, responses
from runtime.server.errors import ApiError, JsonResponse, api_error
from runtime.server.images import image_task
from runtime.server.scheduler import ImageTask
from runtime.server.state import State


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
        view["error"] = api_error(task.error).body()["error"]
    return view


def job_links(answers: dict) -> dict:
    """OpenAPI links from a created job to its status, content and cancel operations."""
    ref = {"job_id": "$response.body#/id"}
    answers[202]["links"] = {
        name: {"operationId": op, "parameters": ref}
        for name, op in (
            ("status", "getImageJob"),
            ("content", "getImageJobContent"),
            ("cancel", "cancelImageJob"),
        )
    }
    return answers


def routes(state: State) -> APIRouter:
    router = APIRouter()

    def get_job(job_id: str) -> dict:
        if job_id not in state.jobs:
            raise ApiError(404, f"no image job {job_id!r}", param="id", code="job_not_found")
        return state.jobs[job_id]

    @router.post(
        "/v1/images/jobs",
        operation_id="createImageJob",
        status_code=202,
        summary="Start an image job (poll it); Idempotency-Key makes a retry safe",
        responses=job_links(
            responses(400, 404, 409, 413, 429, 500, 503, ok=ImageJob, ok_status=202)
        ),
        openapi_extra=contract.request_body("ImageJobRequest"),
    )
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
                return JsonResponse(job_view(state.jobs[job_id]), status_code=202)
        task, fields, tokens = image_task(state, raw, state.job_model)
        if fields["stream"]:
            raise ApiError(
                400, "stream is not supported on the job API; poll the job", param="stream"
            )
        state.submit(task)
        job = {"id": protocol.new_id("imgjob"), "task": task, "fields": fields, "tokens": tokens}
        state.remember_job(job)
        if key is not None:
            state.idempotency[key] = (digest, job["id"])
        location = {"Location": f"/v1/images/jobs/{job['id']}"}
        return JsonResponse(job_view(job), status_code=202, headers=location)

    @router.get(
        "/v1/images/jobs/{job_id}",
        operation_id="getImageJob",
        responses=responses(404, ok=ImageJob),
    )
    def job_status(job_id: str):
        return job_view(get_job(job_id))

    @router.get(
        "/v1/images/jobs/{job_id}/content",
        operation_id="getImageJobContent",
        responses=responses(400, 404, 409, 422, 500, ok=ImagesResponse),
    )
    def job_content(job_id: str):
        job = get_job(job_id)
        task: ImageTask = job["task"]
        if task.status == "succeeded":
            return protocol.images_body(
                task.images,
                seed=task.seed,
                created=int(task.created),
                size=job["fields"]["size"],
                prompt_tokens=job["tokens"],
            )
        if task.status == "failed":
            raise api_error(task.error)
        if task.status == "cancelled":
            raise ApiError(409, f"image job {job_id!r} was cancelled", code="job_cancelled")
        raise ApiError(
            409,
            f"image job {job_id!r} is {task.status} ({task.stage}, "
            f"{task.steps_done}/{task.steps_total} steps)",
            code="job_not_done",
            headers={"Retry-After": "1"},
        )

    @router.post(
        "/v1/images/jobs/{job_id}/cancel",
        operation_id="cancelImageJob",
        responses=responses(404, ok=ImageJob),
    )
    def job_cancel(job_id: str):
        job = get_job(job_id)
        job["task"].cancel()
        return job_view(job)

    return router
