"""Ray Serve scale-out on one machine: a local two-node cluster (`ray.cluster_utils.Cluster`),
two replicas; requests spread over both, and replicas killed at random points under load lose
no request (plain answers are retried until whole; streams end in an error event the client
retries on, never a broken connection)."""

from __future__ import annotations

import base64
import io
import random
import socket
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from runtime.server.app import ServerConfig  # noqa: E402
from runtime.server.ray_serve import RayOptions, build  # noqa: E402

pytestmark = pytest.mark.slow
BODY = {"prompt": "a red circle", "num_inference_steps": 2, "decoder_num_inference_steps": 12}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_url(tiny_engine_dir):
    from ray.cluster_utils import Cluster

    # no dashboard: on a 2-core machine it is the difference between a raylet that registers
    # within Ray's fixed 30 s and one that does not
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServerConfig(engines=tiny_engine_dir, threads=1)
    serve.run(
        build(config, RayOptions(replicas=2, max_ongoing_requests=4), 0.0),
        name="blip3o",
        route_prefix="/",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def fire(url: str, seeds: list[int], results: dict, body: dict = BODY) -> list[threading.Thread]:
    def one(seed):
        try:
            r = httpx.post(f"{url}/v1/images/generations", json={**body, "seed": seed}, timeout=300)
            results[seed] = (r.status_code, r.headers.get("x-replica"), r.json())
        except Exception as err:  # a lost request: recorded, the test fails on it
            results[seed] = (None, None, repr(err))

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    return threads


def test_requests_spread_over_two_replicas(cluster_url):
    results: dict = {}
    for t in fire(cluster_url, list(range(8)), results):
        t.join()
    assert all(code == 200 for code, _, _ in results.values()), results
    assert len({replica for _, replica, _ in results.values()}) == 2
    assert httpx.get(f"{cluster_url}/v1/health/ready").status_code == 200


def replica_actors() -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "Replica" in a["name"] and "Front" not in a["name"]
    ]


def running_replicas() -> int:
    try:
        status = serve.status().applications["blip3o"].deployments["Replica"]
    except (ray.exceptions.RayError, KeyError):  # the controller is busy replacing one
        return 0
    return status.replica_states.get("RUNNING", 0)


def kill_one(rng: random.Random) -> str:
    """Kill one live replica actor (a name still listed for a dead one is skipped)."""
    for _ in range(50):
        names = replica_actors()
        if names:
            victim = rng.choice(names)
            try:
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                return victim
            except (ValueError, ray.exceptions.RayError):
                pass  # gone already
        time.sleep(0.2)
    raise AssertionError("no replica to kill")


def read_stream(url: str, body: dict) -> tuple[str, list[str]]:
    """One streamed request: ("completed" | "replica_lost" | "broken: ..." | other, events)."""
    try:
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=300) as r:
            if r.status_code != 200:
                return f"status {r.status_code}", []
            events = [x[7:] for x in r.iter_lines() if x.startswith("event: ")]
    except httpx.HTTPError as err:  # a broken connection: what must never happen
        return f"broken: {err!r}", []
    if events and events[-1] == "image_generation.completed":
        return "completed", events
    return ("replica_lost" if events and events[-1] == "error" else "incomplete"), events


def test_replicas_killed_at_random_points_lose_no_request(cluster_url, tiny_engine_dir):
    """Plain and streamed requests under load while replicas are killed at random moments,
    one at a time, twice. Plain requests: every one answered 200, equal to a local
    Generator's image (retried by the front when their replica died, mid-answer included).
    Streams: never a broken connection; one whose replica died after its first event ends in
    an `error` event (replica_lost), which the client acts on by retrying: all complete."""
    from runtime.generator import Generator

    rng = random.Random(0)
    body = {**BODY, "num_inference_steps": 8, "decoder_num_inference_steps": 20}
    results: dict = {}
    seeds = list(range(100, 150))
    threads = fire(cluster_url, seeds, results, body)
    streams: dict[int, list] = {}

    def streamer(seed):
        outcomes = []
        for _ in range(4):  # the client acts on replica_lost: it retries
            # long streams (200 decoder steps, 3 previews): a kill often lands mid-stream
            slow = {**body, "decoder_num_inference_steps": 200, "partial_images": 3}
            outcome, _ = read_stream(cluster_url, {**slow, "seed": seed, "stream": True})
            outcomes.append(outcome)
            if outcome != "replica_lost":
                break
        streams[seed] = outcomes

    stream_threads = [threading.Thread(target=streamer, args=(s,)) for s in range(500, 506)]
    for t in stream_threads:
        t.start()
    deadline = time.monotonic() + 180
    while len(results) < 2 and time.monotonic() < deadline:  # the load is under way
        time.sleep(0.05)
    kills = []
    for _ in range(2):
        time.sleep(rng.uniform(0.0, 1.5))  # a random point of the requests under way
        victim = kill_one(rng)
        kills.append((victim, len(results)))
        noticed = time.monotonic() + 15
        while victim in replica_actors() and time.monotonic() < noticed:
            time.sleep(0.2)
        while running_replicas() < 2 and time.monotonic() < deadline:  # Serve replaces it
            time.sleep(0.2)
    for t in threads + stream_threads:
        t.join()
    print(f"kills (replica, answered before): {kills}; stream outcomes: {streams}")
    assert kills[0][1] < len(seeds), "the load finished before the first kill"
    lost = {s: r for s, r in results.items() if r[0] != 200}
    assert not lost, lost
    assert sorted(results) == seeds
    assert all(outcomes[-1] == "completed" for outcomes in streams.values()), streams
    assert not any(o.startswith("broken") for v in streams.values() for o in v), streams
    with Generator.from_dir(tiny_engine_dir) as gen:
        for seed in rng.sample(seeds, 3):
            ref = gen.generate("a red circle", seed=seed, steps=8, decoder_steps=20)[0]
            got = results[seed][2]["data"][0]
            assert got["seed"] == seed
            assert np.array_equal(png(got["b64_json"]), np.asarray(ref))
