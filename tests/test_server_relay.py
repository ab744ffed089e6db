"""The Ray front's relay over scripted replicas (no Ray): a replica that dies at any point before
a plain answer is whole is retried and the client gets the whole answer once; an event stream
is retried until its first event, and a death after that ends it with an `error` event."""

from __future__ import annotations

import asyncio
import json

import pytest

from runtime.server import relay


class Died(Exception):
    """Stands for Ray's ActorDiedError."""


class Busy(Exception):
    """Stands for Ray Serve's BackPressureError."""


class Replica:
    """One replica call: yields `items`, then raises `die` (when given) after `die_after`."""

    def __init__(self, items, die_after=None, error=Died):
        self.items, self.die_after, self.error = list(items), die_after, error
        self.sent, self.cancelled = 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.die_after is not None and self.sent >= self.die_after:
            raise self.error("the replica died")
        if self.sent >= len(self.items):
            raise StopAsyncIteration
        self.sent += 1
        await asyncio.sleep(0)
        return self.items[self.sent - 1]

    def cancel(self):
        self.cancelled = True


def answer(body: bytes, kind: str = "application/json", chunks: int = 3):
    size = -(-len(body) // chunks)
    parts = [("body", body[i : i + size]) for i in range(0, len(body), size)]
    return [("start", 200, [(b"content-type", kind.encode()), (b"content-length", b"9")])] + parts


def calls(*replicas):
    made = list(replicas)
    order = iter(made)
    return (lambda: next(order)), made


def run(coro):
    return asyncio.run(coro)


async def collect(stream) -> bytes:
    return b"".join([chunk async for chunk in stream])


BODY = json.dumps({"data": [{"b64_json": "x" * 300, "seed": 7}]}).encode()


@pytest.mark.parametrize("die_after", [0, 1, 2, 3])  # before the start, mid-answer, ...
def test_a_plain_answer_is_retried_until_whole(die_after):
    call, made = calls(Replica(answer(BODY), die_after=die_after), Replica(answer(BODY)))
    got = run(relay.forward(call, lost=(Died,), retry_for=5))
    assert got.status == 200 and got.body == BODY and got.stream is None
    assert "content-length" not in {k.lower() for k in got.headers}
    assert made[0].cancelled  # the dead replica's call was let go


def test_a_plain_answer_survives_several_deaths_in_a_row():
    deaths = [Replica(answer(BODY), die_after=i % 3) for i in range(4)]
    call, _ = calls(*deaths, Replica(answer(BODY)))
    assert run(relay.forward(call, lost=(Died,), retry_for=30)).body == BODY


def test_no_replica_answering_in_time_is_a_json_503():
    call, _ = calls(*[Replica(answer(BODY), die_after=0) for _ in range(50)])
    got = run(relay.forward(call, lost=(Died,), retry_for=0.3))
    assert got.status == 503 and got.headers["retry-after"]
    assert json.loads(got.body)["error"]["code"] == "replica_lost"


def test_busy_replicas_are_a_json_503():
    call, _ = calls(Replica(answer(BODY), die_after=0, error=Busy))
    got = run(relay.forward(call, lost=(Died,), busy=(Busy,)))
    assert got.status == 503 and json.loads(got.body)["error"]["code"] == "busy"


EVENTS = [b"event: a\ndata: {}\n\n", b"event: b\ndata: {}\n\n", b"data: [DONE]\n\n"]


def stream_items():
    start = ("start", 200, [(b"content-type", b"text/event-stream; charset=utf-8")])
    return [start] + [("body", e) for e in EVENTS]


def test_a_stream_is_retried_until_its_first_event():
    call, _ = calls(Replica(stream_items(), die_after=1), Replica(stream_items()))
    got = run(relay.forward(call, lost=(Died,), retry_for=5))
    assert got.stream is not None
    assert run(collect(got.stream)) == b"".join(EVENTS)


def test_a_stream_whose_replica_dies_mid_way_ends_in_an_error_event():
    call, _ = calls(Replica(stream_items(), die_after=3))
    got = run(relay.forward(call, lost=(Died,), retry_for=5))
    text = run(collect(got.stream)).decode()
    assert text.startswith(EVENTS[0].decode() + EVENTS[1].decode())
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ")
    assert json.loads(last.split("data: ", 1)[1])["error"]["code"] == "replica_lost"


def test_a_client_that_leaves_a_stream_cancels_the_replica():
    replica = Replica(stream_items())
    call, _ = calls(replica)
    got = run(relay.forward(call, lost=(Died,), retry_for=5))

    async def leave():
        events = got.stream
        await events.__anext__()
        await events.aclose()

    run(leave())
    assert replica.cancelled
