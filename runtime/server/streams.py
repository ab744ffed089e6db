"""How a request waits on its task: scheduler events into the request's asyncio queue, the
client's disconnect as a cancel, and server-sent event streams that end in an `error` event
(never a broken connection) when something fails after the answer started."""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from runtime.server import protocol
from runtime.server.errors import internal_error
from runtime.server.scheduler import Cancelled

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a waiting request checks that its client is still there


def bridge(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """A scheduler-thread callback that hands events to a request's asyncio queue."""

    def on_event(kind, task, payload):
        loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    return on_event


async def next_event(request: Request, queue: asyncio.Queue, task):
    """The next scheduler event for `task`; cancels the task if the client went away."""
    while True:
        if await request.is_disconnected():  # cheap: it does not wait
            task.cancel()
            raise Cancelled("the client disconnected")
        try:
            return await asyncio.wait_for(queue.get(), POLL_S)
        except asyncio.TimeoutError:
            pass


async def guarded(events, task, what: str):
    """`events` (an async generator of SSE bytes); an exception inside it is logged once and
    ends the stream with an OpenAI-shaped `error` event; a client gone cancels the task."""
    try:
        async for chunk in events:
            yield chunk
    except (Cancelled, asyncio.CancelledError, GeneratorExit):
        task.cancel()
        raise
    except Exception as err:
        task.cancel()
        log.error("%s stream failed", what, exc_info=err)
        yield protocol.sse(internal_error(err).body(), "error")
