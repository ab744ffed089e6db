"""How the Ray Serve front forwards one HTTP request to a replica so that a replica dying at any
point loses nothing (plain asyncio over any replica call: tested without Ray).

A replica call yields `("start", status, headers)` then `("body", bytes)` chunks (the replica
runs the app in-process, `ray_serve.call_asgi`). The guarantee, by kind of answer:

- **A plain answer** (JSON, text: everything but an event stream) is collected whole before a
  byte of it goes to the client. A replica that dies before the last chunk arrived, whether
  before it answered or in the middle of its answer, is retried on another replica: the
  client gets one complete answer or, after `RETRY_FOR_S` without any replica answering, a
  JSON 503 with `Retry-After`. Generation and chat are deterministic for a body with a seed,
  so a retried answer is the same answer (without a seed, each image says the seed it used).
- **An event stream** (`stream: true`) is retried the same way until its first event arrived.
  After that the events already went to the client and cannot be taken back: a replica that
  dies mid-stream ends the stream with an `error` event (OpenAI's error shape, code
  `replica_lost`), never a broken connection; the client retries the request (the `openai`
  client raises `APIError` on it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
RETRY_FOR_S = 120.0  # how long a request waits for some replica to answer it whole
BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)  # between tries; the last one repeats


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""  # a plain answer, whole
    stream: AsyncIterator[bytes] | None = None  # an event stream under way


def error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def _headers(raw) -> dict[str, str]:
    out = {}
    for k, v in raw:
        key = k.decode("latin-1") if isinstance(k, bytes) else k
        if key.lower() != "content-length":
            out[key] = v.decode("latin-1") if isinstance(v, bytes) else v
    return out


def _is_stream(headers: dict[str, str]) -> bool:
    return any(
        k.lower() == "content-type" and v.startswith("text/event-stream")
        for k, v in headers.items()
    )


async def forward(
    call: Callable[[], AsyncIterator],
    *,
    lost: tuple[type[BaseException], ...],
    busy: tuple[type[BaseException], ...] = (),
    retry_for: float = RETRY_FOR_S,
) -> Answer:
    """Forward one request (`call()` starts it on some replica): a plain answer whole, or an
    event stream once its first event arrived; retried on another replica while a replica is
    `lost` (died, unavailable) before that, for up to `retry_for` seconds. `busy` errors (the
    replicas' queues are full) are a 503 with `Retry-After`."""
    deadline = time.monotonic() + retry_for
    attempt = 0
    while True:
        stream = call()
        try:
            _, status, raw_headers = await stream.__anext__()
            headers = _headers(raw_headers)
            if not _is_stream(headers):
                body = b"".join([item[1] async for item in stream])
                return Answer(status, headers, body=body)
            first = await anext(stream, None)
            return Answer(status, headers, stream=_events(first, stream, lost))
        except busy as err:
            log.warning("replicas busy: %s", err)
            return Answer(
                503,
                {"content-type": "application/json", "retry-after": "2"},
                body=json.dumps(
                    error_body("every replica is busy; retry shortly", "busy")
                ).encode(),
            )
        except lost as err:
            _cancel(stream)
            wait = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            if time.monotonic() + wait > deadline:
                log.error("no replica answered within %.0f s: %s", retry_for, err)
                message = f"no replica could answer within {retry_for:.0f} s; retry"
                return Answer(
                    503,
                    {"content-type": "application/json", "retry-after": "5"},
                    body=json.dumps(error_body(message, "replica_lost")).encode(),
                )
            attempt += 1
            log.warning("replica lost before the answer was whole (%s); retry %d", err, attempt)
            await asyncio.sleep(wait)


async def _events(first: tuple | None, stream, lost) -> AsyncIterator[bytes]:
    """The rest of an event stream; a replica lost mid-stream ends it with an `error` event."""
    finished = False
    try:
        if first is not None:
            yield first[1]
            async for item in stream:
                yield item[1]
        finished = True
    except lost as err:
        finished = True
        log.warning("replica lost mid-stream (%s): the stream ends in an error event", err)
        message = "the replica serving this stream stopped; retry the request"
        yield f"event: error\ndata: {json.dumps(error_body(message, 'replica_lost'))}\n\n".encode()
    finally:
        if not finished:  # the client went away: stop the replica's work
            _cancel(stream)


def _cancel(stream) -> None:
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:  # the replica is gone already
            pass
