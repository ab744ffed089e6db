"""Does step-level batching pay? The HTTP server, batched vs one request at a time, side by side.

    python benchmarks/serving.py --engines engines/tiny-fp32 [--clients 1 4 16] [--requests 32]

For each mode (`batched`: the graphs' batch limit, up to that many requests stepped together;
`one-at-a-time`: `--max-batch 1 --max-running 1`) a server runs on loopback in this process and
`--clients` concurrent clients (threads, httpx) send `/v1/images/generations` requests until
`--requests` have been answered; throughput is images/s over the wall time, latency is per
request (p50/p99). Both modes run at the same settings: steps, clients, requests, and `--threads`
intra-op threads per session (default 1, recorded). Defaults are short (2 DiT + 4 UNet steps) for
a 2-core CPU. Prints the table, then writes JSON (`--out`, default
`benchmarks/out/serving-<folder>.json`; a committed `benchmarks/results/` file only when `--out`
names it) and the chart beside it (.png; needs matplotlib, skipped with a note without it;
`--no-chart`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

MODES = {"batched": {}, "one-at-a-time": {"max_batch": 1, "max_running": 1}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def load(url: str, clients: int, requests: int, body: dict) -> dict:
    import httpx

    latencies, codes, lock = [], [], threading.Lock()
    remaining = [requests]

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                r = http.post(f"{url}/v1/images/generations", json=body)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    codes.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = codes.count(200)
    return {
        "clients": clients,
        "requests": requests,
        "ok": ok,
        "wall_s": wall,
        "images_per_s": ok * body.get("n", 1) / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
    }


def run(
    engines: Path,
    clients: list[int],
    requests: int,
    steps: int,
    decoder_steps: int,
    threads: int,
) -> dict:
    from runtime.server.app import ServerConfig
    from runtime.server.local import local_server

    body = {
        "prompt": "a red circle to the left of a blue square",
        "seed": 0,
        "num_inference_steps": steps,
        "decoder_num_inference_steps": decoder_steps,
    }
    results = {}
    for mode, options in MODES.items():
        config = ServerConfig(
            engines=engines, threads=threads, max_queue=max(clients) * 2, **options
        )
        with local_server(config) as url:
            load(url, 1, 2, body)  # warm the sessions
            results[mode] = [load(url, c, max(requests, c), body) for c in clients]
    return {
        "engines": str(engines),
        "steps": steps,
        "decoder_steps": decoder_steps,
        "threads": threads,
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "modes": results,
    }


def table(data: dict) -> str:
    lines = [f"{'mode':<14} {'clients':>7} {'images/s':>9} {'p50 s':>8} {'p99 s':>8}"]
    for mode, rows in data["modes"].items():
        for r in rows:
            lines.append(
                f"{mode:<14} {r['clients']:>7} {r['images_per_s']:>9.2f} "
                f"{r['p50_s']:>8.3f} {r['p99_s']:>8.3f}"
            )
    return "\n".join(lines)


def chart(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt  # through common.save_chart: matplotlib is there, on Agg

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in data["modes"].items():
        x = [r["clients"] for r in rows]
        a.plot(x, [r["images_per_s"] for r in rows], marker="o", label=mode)
        b.plot(x, [r["p50_s"] for r in rows], marker="o", label=f"{mode} p50")
        b.plot(x, [r["p99_s"] for r in rows], marker="x", linestyle="--", label=f"{mode} p99")
    a.set(xlabel="concurrent clients", ylabel="images / s", title="throughput", xscale="log")
    b.set(xlabel="concurrent clients", ylabel="seconds", title="request latency", xscale="log")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"server on {Path(data['engines']).name}: {data['steps']} DiT + "
        f"{data['decoder_steps']} UNet steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", type=Path, default=Path("engines/tiny-fp32"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per level (>= clients)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--decoder-steps", type=int, default=4)
    p.add_argument("--threads", type=common.threads_count, default=common.DEFAULT_THREADS,
                   help="intra-op threads per session, both modes alike (default 1)")  # fmt: skip
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/out/serving-<folder>"
                   ".json; the chart goes beside it, .png)")  # fmt: skip
    p.add_argument("--no-chart", action="store_true", help="table and JSON only")
    args = p.parse_args(argv)
    if not (args.engines / "manifest.json").is_file():
        print(
            f"error: {args.engines} is not an engine folder; build one with: "
            "python export/build_engines.py --variant tiny",
            file=sys.stderr,
        )
        return 2
    data = run(
        args.engines, args.clients, args.requests, args.steps, args.decoder_steps, args.threads
    )
    print(table(data))
    out = args.out or common.scratch(f"serving-{args.engines.name}.json")
    common.write_json(out, data)
    print(f"wrote {out}")
    if not args.no_chart:
        common.save_chart(lambda path: chart(data, path), out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
