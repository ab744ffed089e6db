"""The scheduler thread: one per Generator, it steps every running request, batching alike ones.

Requests enter a bounded queue (`QueueFull` when it is full: the HTTP layer answers 429 with
`Retry-After`). The thread admits up to `max_running` of them, runs each one's prefill (prompts
differ in length and the prefill graph has no attention mask, so prefills are not batched), then
repeatedly picks the group holding the oldest running request and makes one session call for it:

- a group is the requests at the same call of the same sampler plan: `("dit", call, sampler,
  steps, guidance)`, `("unet", call, decoder_sampler, decoder_steps, decoder_guidance)` or
  `("vae_decoder",)` (`GenerationJob.key`); the step graphs take one timestep, one set of
  sampler coefficients and one guidance per call (`[1]` inputs) and a dynamic `batch` axis, so
  only such requests can share a call (each row carries its own multistep state);
- its rows (a request of `n` images is `n` rows) are concatenated up to `max_batch` (the
  graphs' `batch` max), each with its own seeded noise, and split back after the call.

Each call is the runtime's own `runtime.jobs.generation.step_jobs` over the group's `GenerationJob`s
(the one sampling loop; a request alone is `step_jobs` over one job), timed per stage.
Cancellation (a client gone, or the job API) is checked between calls. Chat requests are token
jobs (`ChatTask`) on the same thread: each turn decodes one token of every running answer, then
makes one image call, so an answer does not hold the image requests up (nor they it).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime import validate
from runtime.errors import Cancelled, ResultError, UserError
from runtime.jobs.answer import TokenJob
from runtime.jobs.generation import GenerationJob, decode_latents, step_jobs, to_pil
from runtime.params import AnswerParams
from runtime.server import adapter

log = logging.getLogger(__name__)
_SEQ = itertools.count()


class QueueFull(Exception):
    """The bounded queue holds `max_queue` requests: shed this one (429 + Retry-After)."""


class SchedulerClosed(Exception):
    """The scheduler is shutting down or failed to start (503)."""


class _Waitable:
    """Completion and cancellation shared by the scheduler's tasks."""

    _done_event: threading.Event
    cancel_requested: bool

    @property
    def done(self) -> bool:
        return self._done_event.is_set()

    def cancel(self) -> None:
        self.cancel_requested = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done_event.wait(timeout)


@dataclass(eq=False)
class ImageTask(_Waitable):
    """One image request as the scheduler sees it (its `GenerationJob`, not yet started, from
    `Generator.start`); the HTTP layer watches its fields."""

    job: GenerationJob
    partial_images: int = 0
    on_event: Callable[[str, ImageTask, object], None] | None = None  # called on the thread
    seq: int = field(default_factory=lambda: next(_SEQ))
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    error: BaseException | None = None
    images: list | None = None  # PIL images once succeeded
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    _done_event: threading.Event = field(default_factory=threading.Event)

    final: tuple | None = None  # (stage, steps done, steps total) once the job is let go
    seed: int = field(init=False, default=0)  # the images' seed (the job's)

    def __post_init__(self) -> None:
        self.seed = self.job.params.seed

    def let_go(self) -> None:
        """Drop the finished job (its noise, features, latents): a kept task holds only its
        images and numbers (the job API keeps hundreds)."""
        if self.job is not None:
            self.final = (self.job.stage, self.job.done_steps, self.job.total)
            self.job = None

    @property
    def stage(self) -> str:
        if self.final is not None:
            return self.final[0]
        return "queued" if self.status == "queued" else self.job.stage

    @property
    def rows(self) -> int:
        return self.job.rows

    @property
    def steps_done(self) -> int:
        return self.final[1] if self.final is not None else self.job.done_steps

    @property
    def steps_total(self) -> int:
        return self.final[2] if self.final is not None else self.job.total

    def partial_steps(self) -> set[int]:
        """UNet call indices after which a partial image is sent (evenly spaced, not the last)."""
        n, k = len(self.job.decoder.calls), self.partial_images
        return {round((j + 1) * n / (k + 1)) - 1 for j in range(k)} - {n - 1} if k else set()


@dataclass(eq=False)
class ChatTask(_Waitable):
    """One chat answer: its `TokenJob` is opened on the scheduler thread and advanced one token per
    turn, interleaved with the image requests' calls. Events: ("text", the new text) as it is
    decoded, ("done", None); `result` is the `adapter.Answer` once succeeded."""

    image: object  # a PIL image
    question: str
    options: AnswerParams
    on_event: Callable[[str, ChatTask, object], None] | None = None  # called on the thread
    seq: int = field(default_factory=lambda: next(_SEQ))
    status: str = "queued"
    job: TokenJob | None = None
    result: adapter.Answer | None = None
    error: BaseException | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    _done_event: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """Owns a Generator and the thread that steps it; thread-safe `submit` for the HTTP layer."""

    def __init__(
        self,
        gen,
        *,
        max_batch: int | None = None,
        max_running: int | None = None,
        max_queue: int = 64,
        metrics=None,
    ) -> None:
        limit = adapter.max_batch(gen)
        self.gen = gen
        self.max_batch = validate.integer(
            "max_batch", limit if max_batch is None else max_batch, 1, limit
        )
        self.max_running = validate.integer(
            "max_running", self.max_batch if max_running is None else max_running, 1, 4096
        )
        self.max_queue = validate.integer("max_queue", max_queue, 0, 1 << 20)
        self.metrics = metrics
        self._queue: collections.deque = collections.deque()
        self._running: list[ImageTask | ChatTask] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="blip3o-scheduler", daemon=True)
        self.step_seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self._thread.start()

    # public ---------------------------------------------------------------------------------
    def submit(self, task) -> None:
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"the queue holds {len(self._queue)} requests (max {self.max_queue})"
                )
            self._queue.append(task)
            self._gauges()
            self._cv.notify()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def queue_depth(self) -> int:
        return len(self._queue)

    def running(self) -> int:
        return len(self._running)

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # the thread -----------------------------------------------------------------------------
    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.running.set(len(self._running))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._queue and not self._running:
                    self._cv.wait()
                if self._closed:
                    pending = list(self._queue) + self._running
                    self._queue.clear()
                    self._running.clear()
                    break
                while self._queue and len(self._running) < self.max_running:
                    self._running.append(self._queue.popleft())
                self._gauges()
            try:
                self._step_once()
            except Exception as err:  # a bug in the scheduler itself: fail what is running
                for task in list(self._running):
                    self._finish(task, "failed", err)  # logged by the first _finish
                    err = _Logged(f"internal scheduler error ({type(err).__name__})")
        for task in pending:
            task.error = SchedulerClosed("the server shut down before this request finished")
            task.status = "cancelled"
            _close_job(task)
            if isinstance(task, ImageTask):
                task.let_go()
            task._done_event.set()
            self._emit("done", task, None)

    def _count_cancel(self) -> None:
        if self.metrics is not None:
            self.metrics.cancels.inc()

    def _finish(
        self, task: ImageTask | ChatTask, status: str, error: BaseException | None = None
    ) -> None:
        task.status, task.error, task.finished = status, error, time.time()
        if status == "cancelled":
            self._count_cancel()
        if status == "failed" and error is not None and not _user_error(error):
            # a bug, not a bad request: logged here once, answered as a JSON 500
            log.error("request failed", exc_info=(type(error), error, error.__traceback__))
        with self._cv:
            if task in self._running:
                self._running.remove(task)
            self._gauges()
        _close_job(task)  # nothing of it stays open
        if isinstance(task, ImageTask):
            task.let_go()
        task._done_event.set()
        self._emit("done", task, None)

    def _emit(self, kind: str, task: ImageTask | ChatTask, payload) -> None:
        if task.on_event is not None:
            try:
                task.on_event(kind, task, payload)
            except Exception:
                log.exception("event callback failed")

    def _timed(self, stage: str, rows: int, fn):
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        self.step_seconds[stage] += seconds
        self.calls[stage] += 1
        if self.metrics is not None:
            self.metrics.step_seconds.labels(stage).observe(seconds)
            self.metrics.batch_size.labels(stage).observe(rows)
        return out

    def _step_once(self) -> None:
        for task in [t for t in self._running if t.cancel_requested]:
            self._finish(task, "cancelled", Cancelled("cancelled"))
        for task in [t for t in self._running if isinstance(t, ChatTask)]:
            self._answer_step(task)  # one token of every answer per turn
        images = [t for t in self._running if isinstance(t, ImageTask)]
        fresh = [t for t in images if t.status == "queued"]
        for task in fresh:  # all admitted prefills first, so a burst stays in step
            task.status, task.started = "running", time.time()
            self._run([task])
        if fresh or not images:
            return
        oldest = min(images, key=lambda t: t.seq)
        key = oldest.job.key()
        group, rows = [], 0
        for task in sorted(images, key=lambda t: t.seq):
            if task.job.key() == key and rows + task.rows <= self.max_batch:
                group.append(task)
                rows += task.rows
        self._run(group)

    def _answer_step(self, task: ChatTask) -> None:
        """The next token of one answer (its first call runs the vision graph and prefill)."""
        stage = "decode" if task.job is not None else "chat_prefill"
        try:
            with self.gen.lock:
                if task.job is None:
                    task.status, task.started = "running", time.time()
                    task.job = TokenJob(self.gen, task.image, task.question, task.options)
                text = self._timed(stage, 1, task.job.next_text)
        except Exception as err:
            self._finish(task, "failed", err)
            return
        if text:
            self._emit("text", task, text)
        if task.job.done:
            task.result = adapter.answer_of(task.job)
            self._finish(task, "succeeded")

    def _run(self, group: list[ImageTask]) -> None:
        """One session call for `group` (equal job keys), then each task's events."""
        first = group[0].job
        stage, call = first.stage, first.call
        rows = sum(t.rows for t in group)
        try:
            with self.gen.lock:
                self._timed(stage, rows, lambda: step_jobs(self.gen, [t.job for t in group]))
        except Exception as err:
            for task in group:
                self._finish(task, "failed", err)
            return
        for task in group:
            if task.job.error is not None:
                self._finish(task, "failed", task.job.error)
            elif task.job.done:
                task.images = task.job.result()
                self._finish(task, "succeeded")
            else:
                self._emit("progress", task, None)
        partial = [
            t for t in group
            if stage == "unet" and not t.done and t.job.error is None
            and call in t.partial_steps()
        ]  # fmt: skip
        if partial:  # previews: the current latents through the VAE, for those that asked
            jobs = [t.job for t in partial]
            with self.gen.lock:
                rows = sum(t.rows for t in partial)
                images = self._timed("vae_decoder", rows, lambda: decode_latents(self.gen, jobs))
            for task, part in zip(partial, images):
                index = sorted(task.partial_steps()).index(call)
                self._emit("partial", task, (index, [to_pil(x) for x in part]))


class _Logged(RuntimeError):
    """An error already logged (the other tasks of a failed step)."""


def _user_error(err: BaseException) -> bool:
    """A bad request or a non-finite result: answered as a 4xx, not logged as a bug."""
    return isinstance(err, (UserError, ResultError, Cancelled, _Logged))


def _close_job(task) -> None:
    """Cancel a finished task's runtime job unless it completed (a chat's may not exist yet)."""
    job = task.job
    if job is not None and not job.done:
        job.cancel()
