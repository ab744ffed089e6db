"""Does the HTTP server leak under a long mixed load? Valid and hostile requests, in turn, from a
few clients against one server in this process; its RSS, open files and threads are sampled as
it goes, and at the end nothing may be left running, queued or open.

    python benchmarks/soak_server.py --engines engines/tiny-fp32 --requests 1000 --clients 4

The mix (by request number): images (plain, streamed, n=2), chat (plain, streamed), image jobs
(polled to the end, or cancelled), clients that leave mid-request, and hostile bodies: JSON the
parser chokes on (deep nesting, a 5000-digit integer, NaN, bytes that are not UTF-8), lone
surrogates in a prompt and a question, images no decoder takes, absurd values, unknown models.
Every answer must be the expected one (valid: 200/202, hostile: an OpenAI-shaped 4xx), never a
5xx. After a warm-up (`--warmup` requests), RSS must stay within `--budget` of its first sample.
Writes JSON (`--out`, default benchmarks/out/soak-server-<folder>.json) and prints a summary.
Linux only (reads /proc/self).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

FAST = {"num_inference_steps": 1, "decoder_num_inference_steps": 1}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def growth(samples: list[int]) -> float:
    """Largest later value over the first, minus one (0.0 for a flat series)."""
    return max(samples) / samples[0] - 1.0 if samples and samples[0] else 0.0


def _png(corrupt: bool = False) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 90, 200)).save(buf, format="PNG")
    raw = buf.getvalue()
    if corrupt:
        raw = raw[:40] + b"\x00" * 16 + raw[56:]
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _chat(url: str, question: str = "What is it?", **extra) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return {"max_tokens": 2, "messages": [{"role": "user", "content": content}], **extra}


IMG, CHAT, JOBS = "/v1/images/generations", "/v1/chat/completions", "/v1/images/jobs"


def cases() -> list[tuple[str, str, object, set[int]]]:
    """(name, path, body: dict or raw bytes, expected statuses); request i takes case i % len."""
    good, bad = _png(), _png(corrupt=True)
    return [
        ("image", IMG, {"prompt": "a red circle", **FAST}, {200}),
        ("deep json", IMG, b"[" * 20_000 + b"]" * 20_000, {400}),
        ("chat", CHAT, _chat(good), {200}),
        ("huge integer", IMG, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", {400}),
        ("image stream", IMG, {"prompt": "a blue square", "stream": True, **FAST}, {200}),
        ("surrogate prompt", IMG, b'{"prompt": "a \\ud800 b"}', {400}),
        ("chat stream", CHAT, _chat(good, stream=True), {200}),
        ("broken png", CHAT, _chat(bad), {400}),
        ("job", JOBS, {"prompt": "a green triangle", **FAST}, {202}),
        ("nan", IMG, b'{"prompt": "x", "guidance_scale": NaN}', {400}),
        ("two images", IMG, {"prompt": "two squares", "n": 2, **FAST}, {200}),
        ("not utf-8", CHAT, b'{"messages": "\xff\xfe"}', {400}),
        ("job cancelled", JOBS, {"prompt": "slow", "num_inference_steps": 2}, {202}),
        ("surrogate question", CHAT, json.dumps(_chat(good, "a \udcff?")).encode(), {400}),
        ("client leaves", IMG, {"prompt": "slow", "num_inference_steps": 2}, {None}),
        ("absurd steps", IMG, {"prompt": "x", "num_inference_steps": 10**9}, {400}),
        ("unknown model", CHAT, _chat(good, model="gpt-4o"), {404}),
        ("bad type", IMG, {"prompt": ["a", "list"]}, {400}),
    ]


def _check(name: str, r, want: set) -> str | None:
    """None when the answer is the expected one, else what was wrong."""
    if r.status_code not in want:
        return f"{name}: {r.status_code} {r.text[:160]}"
    if r.status_code >= 400:
        err = r.json().get("error", {})
        if set(err) != {"message", "type", "param", "code"} or "\n" in err["message"]:
            return f"{name}: not OpenAI-shaped: {r.text[:160]}"
    return None


def _one(http, url: str, name: str, path: str, body, want: set) -> str | None:
    import httpx

    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    if name == "client leaves":
        try:
            http.post(f"{url}{path}", timeout=0.05, **kw)
        except httpx.TimeoutException:
            pass
        return None
    if isinstance(body, dict) and body.get("stream"):
        with http.stream("POST", f"{url}{path}", **kw) as r:
            text = "".join(r.iter_text())
        if r.status_code != 200 or "event: error" in text:
            return f"{name}: {r.status_code} {text[-160:]}"
        return None
    r = http.post(f"{url}{path}", **kw)
    problem = _check(name, r, want)
    if problem is None and path == JOBS:
        job = r.json()["id"]
        if name == "job cancelled":
            http.post(f"{url}{JOBS}/{job}/cancel")
        else:
            for _ in range(6000):
                c = http.get(f"{url}{JOBS}/{job}/content")
                if c.status_code != 409:
                    break
                time.sleep(0.01)
            problem = _check(name + " content", c, {200})
    return problem


def soak(
    engines: Path,
    *,
    requests: int,
    clients: int = 4,
    warmup: int = 100,
    every: int = 50,
    threads: int = 1,
    budget: float = 0.10,
) -> dict:
    """Run the server soak; return its samples, problems and verdicts as plain data."""
    import httpx

    from runtime.server.local import local_server
    from runtime.server.state import MAX_JOBS_KEPT, ServerConfig, State

    config = ServerConfig(engines=engines, threads=threads, max_queue=256)
    state = State(config)
    mix = cases()
    problems: list[str] = []
    samples: list[dict] = []
    lock = threading.Lock()
    todo = iter(range(requests))
    done = [0]
    start = time.perf_counter()

    with local_server(config, state=state) as url:

        def client() -> None:
            with httpx.Client(timeout=300) as http:
                while True:
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    name, path, body, want = mix[i % len(mix)]
                    problem = _one(http, url, name, path, body, want)
                    with lock:
                        done[0] += 1
                        if problem:
                            problems.append(problem)
                        if done[0] >= warmup and (done[0] - warmup) % every == 0:
                            samples.append(
                                {
                                    "request": done[0],
                                    "rss": rss_bytes(),
                                    "fds": len(os.listdir("/proc/self/fd")),
                                    "threads": threading.active_count(),
                                }
                            )

        pool = [threading.Thread(target=client) for _ in range(clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        deadline = time.monotonic() + 60
        scheduler = state.scheduler
        while (scheduler.running() or scheduler.queue_depth()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the last cancelled / abandoned requests end between steps
        ready = httpx.get(f"{url}/v1/health/ready").status_code
        left = {
            "running": scheduler.running(),
            "queued": scheduler.queue_depth(),
            "open_jobs": len(state.gen._jobs),
            "jobs_kept": len(state.jobs),
            "jobs_kept_max": MAX_JOBS_KEPT,
            "idempotency_keys": len(state.idempotency),
        }
    rss = [s["rss"] for s in samples]
    return {
        "engines": str(engines),
        "requests": requests,
        "clients": clients,
        "seconds": round(time.perf_counter() - start, 1),
        "mix": [name for name, *_ in mix],
        "samples": samples,
        "rss_growth": round(growth(rss), 4),
        "fds_growth": round(growth([s["fds"] for s in samples]), 4),
        "budget": budget,
        "flat": growth(rss) <= budget,
        "problems": problems,
        "ready_after": ready,
        "left": left,
        "no_leaks": left["running"] == left["queued"] == left["open_jobs"] == 0
        and left["jobs_kept"] <= MAX_JOBS_KEPT,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", type=Path, default=Path("engines/tiny-fp32"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument(
        "--threads", type=common.threads_count, default=common.DEFAULT_THREADS,
        help="ONNX Runtime intra-op threads (default 1)",
    )  # fmt: skip
    parser.add_argument("--budget", type=float, default=0.10, help="RSS growth allowed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = soak(
        args.engines,
        requests=args.requests,
        clients=args.clients,
        warmup=args.warmup,
        every=args.every,
        threads=args.threads,
        budget=args.budget,
    )
    out = common.write_json(
        args.out or common.scratch(f"soak-server-{args.engines.name}.json"), report
    )
    print(f"wrote {out}")
    first, last = report["samples"][0], report["samples"][-1]
    print(
        f"{report['requests']} requests ({len(report['mix'])} kinds, {report['clients']} "
        f"clients) in {report['seconds']} s; RSS {first['rss'] / 2**20:.1f} -> "
        f"{last['rss'] / 2**20:.1f} MiB, growth {report['rss_growth']:.1%} (budget "
        f"{report['budget']:.0%}: {'flat' if report['flat'] else 'GROWING'}); open files "
        f"{first['fds']} -> {last['fds']}; threads {first['threads']} -> {last['threads']}; "
        f"problems: {len(report['problems'])}; left: {report['left']}"
    )
    return 0 if report["flat"] and report["no_leaks"] and not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
