"""A bounded load test on loopback: 200 requests from 16 concurrent clients against a small
queue; every request is answered 200 or shed with 429 (Retry-After), none lost or duplicated,
and the server's RSS stays flat after warm-up."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from runtime.server.app import ServerConfig  # noqa: E402
from runtime.server.local import local_server  # noqa: E402

pytestmark = pytest.mark.slow
REQUESTS, CLIENTS = 200, 16


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_load_every_request_answered_or_shed(tiny_engine_dir):
    body = {"prompt": "a red circle", "num_inference_steps": 1, "decoder_num_inference_steps": 1}
    config = ServerConfig(engines=tiny_engine_dir, threads=1, max_queue=8)

    def load(url) -> dict[int, tuple]:
        """REQUESTS requests from CLIENTS threads; {request: (status, body ok, Retry-After)}."""
        answers: dict[int, tuple] = {}
        lock = threading.Lock()
        todo = iter(range(REQUESTS))

        def client():
            with httpx.Client(timeout=300) as http:
                while True:
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    r = http.post(f"{url}/v1/images/generations", json={**body, "seed": i})
                    ok = r.status_code == 200 and len(r.json()["data"]) == 1
                    with lock:
                        assert i not in answers
                        answers[i] = (r.status_code, ok, r.headers.get("retry-after"))

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return answers

    with local_server(config) as url:
        for _ in range(20):  # warm-up: sessions, allocator pools
            httpx.post(f"{url}/v1/images/generations", json=body, timeout=300)
        load(url)  # the first round also warms the clients' threads and connections (same process)
        before = rss()
        answers = load(url)
        after = rss()
        assert httpx.get(f"{url}/v1/health/ready").status_code == 200
    assert sorted(answers) == list(range(REQUESTS))  # none lost, none twice
    codes = {code for code, _, _ in answers.values()}
    assert codes <= {200, 429}, codes
    assert all(ok for code, ok, _ in answers.values() if code == 200)
    assert all(int(ra) >= 1 for code, _, ra in answers.values() if code == 429)
    # how many are served rather than shed depends on the machine's speed: not asserted beyond
    # "some" (a timed threshold would fail on a loaded CI machine)
    assert sum(code == 200 for code, _, _ in answers.values()) >= 1
    assert after <= before * 1.10, (before, after)  # flat: within 10%
