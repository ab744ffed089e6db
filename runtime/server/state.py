"""What one server holds, and admission: the Generator and its scheduler, readiness, the bounded
queue's answers (429 / 503 with `Retry-After`), the job table and the request models.

`State.start()` opens the engine folder, starts the scheduler and warms up (one short
generation, which also computes the decoder's negative features) before the server answers
ready; it runs on a thread so `live` answers meanwhile. The request models are derived when the
state is made, from the folder's manifest where it reads (the served size, batch, presets).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from runtime.server.errors import ApiError
from runtime.server.metrics import Metrics
from runtime.server.models import chat_request_model, image_request_model
from runtime.server.scheduler import ImageTask, QueueFull, Scheduler, SchedulerClosed

log = logging.getLogger(__name__)
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
    max_steps: int | None = None  # most DiT / decoder steps a request may take (default 1000)


def _folder_limits(config: ServerConfig) -> dict:
    """The served folder's size, batch and presets for the request models ({} when the
    manifest does not read: `start` reports that)."""
    from runtime.folder.engine_folder import EngineFolder

    try:
        folder = EngineFolder(config.engines)
        return {
            "model": config.model_name or f"blip3o-{folder.variant}-{folder.precision}",
            "image_size": folder.image_size,
            "max_images": folder.batch_range()[1],
            "presets": tuple((folder.sampler.get("presets") or {}).keys()),
        }
    except Exception as err:  # reported by start(), with the reason
        log.debug("request models without the folder's limits: %s", err)
        return {}


class State:
    """What one app holds: the Generator, its scheduler, the job table, metrics, models."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.gen = None
        self.model = config.model_name or "blip3o"
        self.image_size = 0
        self.ready = False
        self.failure: str | None = None
        self.replica = config.replica or f"{socket.gethostname()}:{os.getpid()}"
        self.jobs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.idempotency: dict[str, tuple[str, str]] = {}
        self.latency_ema = 1.0
        limits = _folder_limits(config)
        self.image_model = image_request_model(**limits, max_steps=config.max_steps)
        self.job_model = image_request_model(**limits, max_steps=config.max_steps, job=True)
        self.chat_model = chat_request_model(limits.get("model"))

    def start(self) -> None:
        """Open the folder, start the scheduler, warm up (on a thread: `live` answers
        meanwhile)."""
        try:
            from runtime.generator import Generator

            c = self.config
            options = {"threads": c.threads} if c.threads and c.backend == "onnxruntime" else None
            self.gen = Generator.from_dir(
                c.engines, backend=c.backend, device=c.device, session_options=options
            )
            m = self.gen.manifest
            self.model = c.model_name or f"blip3o-{m['variant']}-{m['precision']}"
            self.image_size = self.gen.folder.image_size
            self.scheduler = Scheduler(
                self.gen,
                max_batch=c.max_batch,
                max_running=c.max_running,
                max_queue=c.max_queue,
                metrics=self.metrics,
            )
            if c.warmup:
                task = ImageTask(self.gen.start("warm-up", seed=0, steps=1, decoder_steps=1))
                self.scheduler.submit(task)
                task.wait()
                if task.status != "succeeded":
                    raise RuntimeError(f"warm-up failed: {task.error}")
            self.ready = True
            log.info("ready: %s (%s)", self.model, c.engines)
        except Exception as err:
            self.failure = " ".join(f"{type(err).__name__}: {err}".split())
            log.error("the server could not start: %s", self.failure)

    def alive(self) -> bool:
        s = self.scheduler
        return not self.failure and (s is None or s.alive())

    def retry_after(self) -> int:
        s = self.scheduler
        if s is None:
            return 5
        waiting = s.queue_depth() / max(s.max_running, 1)
        return max(1, math.ceil(self.latency_ema * max(waiting, 1)))

    def observe(self, seconds: float) -> None:
        self.latency_ema = 0.8 * self.latency_ema + 0.2 * seconds

    def check_ready(self) -> None:
        """503 + Retry-After while the folder is opening (or failed to)."""
        if not self.ready or self.scheduler is None:
            self.metrics.rejections.labels("not_ready").inc()
            raise ApiError(
                503,
                self.failure or "the server is starting; retry shortly",
                type="server_error",
                code="not_ready",
                headers={"Retry-After": "5"},
            )

    def submit(self, task) -> None:
        """Queue a task, or answer 429 (queue full) / 503 (not ready, shutting down)."""
        self.check_ready()
        try:
            self.scheduler.submit(task)
        except QueueFull as err:
            self.metrics.rejections.labels("queue_full").inc()
            raise ApiError(
                429,
                f"the server is busy ({err}); retry later",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            ) from err
        except SchedulerClosed as err:
            self.metrics.rejections.labels("shutting_down").inc()
            raise ApiError(
                503,
                str(err),
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": "5"},
            ) from err

    def remember_job(self, job: dict) -> None:
        """Keep a job for its polls; the oldest finished ones go past `MAX_JOBS_KEPT`."""
        self.jobs[job["id"]] = job
        excess = len(self.jobs) - MAX_JOBS_KEPT
        if excess > 0:
            done = [i for i, j in list(self.jobs.items())[:-1] if j["task"].done]
            for old_id in done[:excess]:  # the oldest finished ones
                self.jobs.pop(old_id)
            for key in [k for k, (_, j) in self.idempotency.items() if j not in self.jobs]:
                del self.idempotency[key]
