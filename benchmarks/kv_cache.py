"""Does a token cost the same at a long context as at a short one? ms/token of the in-place KV
cache, side by side, in one run.

    python benchmarks/kv_cache.py --engines engines/tiny-fp32 --tokens 48 --threads 1

Two token jobs open at once on one Generator, the same image and question: `short` decodes
right after the prefill (its cache sized for the prompt + `--tokens`); `long` first appends
tokens until its position is `--tokens` rows short of the decode graph's capacity (the largest
cache the folder allows). Then they decode interleaved, one token each in turn, so both see the
same machine load. Each timed token is one `step()` (the decode graph on the
job's per-layer cache, the one-row write, the sampler); eos is disabled for the run so both
decode exactly `--tokens` tokens. Reports min / median ms per token per context and the ratio
long/short (target <= 1.3 on tiny: with a cache that grew by copy, every token copied the whole
past; with one stacked cache input, ONNX Runtime split it into layers, a copy, every token).
Both contexts run in one process at `--threads` (default 1, recorded). Prints the table, then
writes JSON (`--out`, default `benchmarks/out/kv-cache-<variant>.json`; the committed
`benchmarks/results/kv-cache-tiny.json` only when `--out` names it). Torch-free.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

TARGET = 1.3
QUESTION = "Describe the image."


def _timed_token(job) -> float:
    start = time.perf_counter()
    job.step()
    return (time.perf_counter() - start) * 1000


def measure(engines: Path, *, tokens: int = 48, threads: int = common.DEFAULT_THREADS) -> dict:
    from runtime.generator import Generator

    options = {"threads": threads}
    image = np.full((64, 64, 3), 255, np.uint8)
    image[8:28, 30:50] = (40, 80, 220)
    with Generator.from_dir(engines, verify=False, session_options=options) as gen:
        gen.folder.config = copy.deepcopy(gen.folder.config)
        gen.config["backbone"]["eos_token_id"] = -1  # no early stop: both decode `tokens`
        capacity = gen.folder.spec("decode").dim("capacity").max
        jobs = {
            "short": gen.start_answer(image, QUESTION, max_new_tokens=tokens + 4),
            "long": gen.start_answer(image, QUESTION, max_new_tokens=capacity),
        }
        first = {name: job.step() for name, job in jobs.items()}  # prefill
        fill = capacity - tokens - 4 - jobs["long"]._position  # room for warm-up + timed
        if fill < 0:
            raise SystemExit(
                f"--tokens {tokens} leaves no long context (capacity {capacity}, prompt "
                f"{jobs['long']._position})"
            )
        jobs["long"].append_tokens([first["long"]] * fill)
        rows = {name: job._position for name, job in jobs.items()}
        for job in jobs.values():  # warm-up
            _timed_token(job), _timed_token(job)
        times = {name: [] for name in jobs}
        for _ in range(tokens):  # interleaved: both contexts see the same machine load
            for name, job in jobs.items():
                times[name].append(_timed_token(job))
        results = {
            name: {
                "context_rows": rows[name],
                "cache_capacity": job.capacity,
                "tokens": tokens,
                "ms_per_token_min": min(times[name]),
                "ms_per_token_median": statistics.median(times[name]),
            }
            for name, job in jobs.items()
        }
        for job in jobs.values():
            job.cancel()
    ratio = results["long"]["ms_per_token_median"] / results["short"]["ms_per_token_median"]
    return {
        "engines": str(engines),
        "threads": threads,
        "short": results["short"],
        "long": results["long"],
        "long_over_short": ratio,
        "target": TARGET,
        "meets_target": ratio <= TARGET,
    }


def table(report: dict) -> str:
    lines = ["| context | rows | cache capacity | ms/token min | ms/token median |"]
    lines.append("|---|---|---|---|---|")
    for name in ("short", "long"):
        r = report[name]
        lines.append(
            f"| {name} | {r['context_rows']} | {r['cache_capacity']} | "
            f"{r['ms_per_token_min']:.2f} | {r['ms_per_token_median']:.2f} |"
        )
    verdict = "meets" if report["meets_target"] else "misses"
    lines.append(
        f"\nlong/short = {report['long_over_short']:.2f} ({verdict} the <= {TARGET} target)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path, default=Path("engines/tiny-fp32"))
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument(
        "--threads",
        type=common.threads_count,
        default=common.DEFAULT_THREADS,
        help="ONNX Runtime intra-op threads, both contexts alike (default 1)",
    )
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/out/kv-cache-<variant>)")
    args = parser.parse_args(argv)
    if not (args.engines / "manifest.json").is_file():
        print(f"error: no engine folder at {args.engines}; build with "
              "python export/build_engines.py --variant tiny", file=sys.stderr)  # fmt: skip
        return 2
    report = measure(args.engines, tokens=args.tokens, threads=args.threads)
    print(table(report))
    variant = json.loads((args.engines / "manifest.json").read_text())["variant"]
    out = args.out or common.scratch(f"kv-cache-{variant}.json")
    common.write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
