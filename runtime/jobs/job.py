"""What both jobs share: one lifecycle and one vocabulary.

A job is made by its Generator (`start` / `start_answer`) and advanced by the caller:

    while not job.done:
        job.step()          # one session call (a generation: returns its stage; an answer: a token)
    result = job.result()   # images, or the answer's text

`done` is True once the job finished, failed (`error` holds why) or was `cancel()`led
(`cancelled`). `result()` runs the job to its end, then returns what it made, raises its error,
or raises `runtime.errors.Cancelled`. A job opens with the Generator at its first step (so
making one touches nothing shared) and closes when it is done: it then holds no session, cache
or buffer. Every step holds the Generator's `lock`, so jobs may be stepped from several threads.
"""

from __future__ import annotations

from runtime.errors import Cancelled


class Job:
    what = "job"  # how messages name it: "generation", "answer"

    def __init__(self, gen) -> None:
        self.gen = gen
        self.error: BaseException | None = None  # why the job failed, once it did
        self.cancelled = False
        self._opened = self._ended = False

    @property
    def done(self) -> bool:
        """Finished, failed or cancelled: nothing more to step."""
        return self._ended

    def is_done(self) -> bool:  # onnxruntime-genai's spelling
        return self.done

    def cancel(self) -> None:
        """Stop here: the job is done and holds nothing afterwards; `result()` says cancelled.
        Cancelling a job that is already done changes nothing."""
        with self.gen.lock:
            if not self._ended:
                self.cancelled = True
                self._end()

    def result(self):
        while not self.done:
            self.step()
        self.raise_if_unfinished()
        return self._result()

    def raise_if_unfinished(self) -> None:
        """Raise why a done job has no result: its error, or `Cancelled`."""
        if self.cancelled:
            raise Cancelled(f"this {self.what} was cancelled")
        if self.error is not None:
            raise self.error

    def _check_steppable(self) -> None:
        """Before a step: a live job opens (first step) or goes on; a done one says why not."""
        if self.cancelled:
            raise Cancelled(f"this {self.what} was cancelled")
        if self.error is not None:
            raise RuntimeError(f"this {self.what} failed: {self.error}")
        if self._ended:
            raise RuntimeError(f"this {self.what} is finished; call result()")
        if not self._opened:
            self._opened = True
            self.gen.open_job(self)

    def _fail(self, err: BaseException) -> None:
        self.error = err
        self._end()

    def _end(self) -> None:
        self._ended = True
        self._release()
        if self._opened:
            self.gen.close_job(self)

    # per job kind ---------------------------------------------------------------------------
    def step(self):
        raise NotImplementedError

    def _result(self):
        raise NotImplementedError

    def _release(self) -> None:
        """Drop what the job holds (arrays, caches)."""
