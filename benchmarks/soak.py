"""Does one long-lived Generator leak? Many generations and answers in one process, with the
process's resident memory (RSS) and open file descriptors sampled as it goes.

    python benchmarks/soak.py --engines engines/tiny-fp32 --generations 200 --answers 200

After a warm-up (the first `--warmup` calls of each kind, which open sessions and fill
allocator pools), RSS and open files must stay flat: the report gives the growth from the first
sample after warm-up to the largest later one, as a ratio, against the 5% budget. Prints a
table, then writes JSON (`--out`, default `benchmarks/out/soak-<folder>.json`; the committed
`benchmarks/results/soak-tiny-fp32.json` only when `--out` names it). `--threads` defaults to 1
(recorded). Linux only (reads /proc/self); torch-free, like the runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

BUDGET = 0.05


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def growth(samples: list[int]) -> float:
    """Largest later value over the first, minus one (0.0 for a flat series)."""
    return max(samples) / samples[0] - 1.0 if samples and samples[0] else 0.0


def soak(
    engines: Path,
    *,
    generations: int,
    answers: int,
    warmup: int = 10,
    every: int = 10,
    threads: int = common.DEFAULT_THREADS,
    steps: int | None = None,
    decoder_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the soak; return its samples and verdicts as plain data."""
    from tqdm import tqdm

    from runtime.generator import Generator

    samples: dict[str, list] = {"generate": [], "answer": []}
    options = {"threads": threads}
    start = time.perf_counter()
    with Generator.from_dir(engines, session_options=options) as gen:
        image = None
        for kind, count in (("generate", generations), ("answer", answers)):
            bar = tqdm(range(count), desc=kind, disable=not progress, unit="call")
            for i in bar:
                if kind == "generate":
                    prompt = ("a red circle", "two blue squares", "a green triangle")[i % 3]
                    image = gen.generate(prompt, seed=i, steps=steps, decoder_steps=decoder_steps)[
                        0
                    ]
                else:
                    gen.answer(image, ("Describe the image.", "How many shapes?")[i % 2])
                if i + 1 >= warmup and (i + 1 - warmup) % every == 0:
                    samples[kind].append({"call": i + 1, "rss": rss_bytes(), "fds": open_files()})
    report = {
        "engines": str(engines),
        "generations": generations,
        "answers": answers,
        "warmup": warmup,
        "threads": threads,
        "seconds": round(time.perf_counter() - start, 1),
        "budget": BUDGET,
        "samples": samples,
    }
    for kind, rows in samples.items():
        report[f"{kind}_rss_growth"] = growth([r["rss"] for r in rows])
        report[f"{kind}_fds_growth"] = growth([r["fds"] for r in rows])
    report["flat"] = all(
        report[f"{k}_{m}_growth"] <= BUDGET for k in samples for m in ("rss", "fds") if samples[k]
    )
    return report


def print_table(report: dict) -> None:
    print(f"{'calls':<10} {'RSS first -> max (MiB)':>24} {'growth':>8} {'open files':>12}")
    for kind, rows in report["samples"].items():
        if not rows:
            continue
        rss = [r["rss"] / 2**20 for r in rows]
        fds = [r["fds"] for r in rows]
        print(
            f"{kind:<10} {rss[0]:>11.1f} -> {max(rss):<10.1f} "
            f"{report[f'{kind}_rss_growth']:>7.1%} {fds[0]:>5} -> {max(fds):<5}"
        )
    verdict = "flat" if report["flat"] else "GROWING"
    print(
        f"{verdict} within {report['budget']:.0%} after {report['warmup']} warm-up calls "
        f"({report['seconds']} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, default=Path("engines/tiny-fp32"))
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--answers", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--every", type=int, default=10, help="sample every N calls")
    parser.add_argument("--threads", type=common.threads_count, default=common.DEFAULT_THREADS)
    parser.add_argument("--steps", type=int, help="DiT steps (manifest default)")
    parser.add_argument("--decoder-steps", type=int, help="UNet steps (manifest default)")
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/out/soak-<folder>.json)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not (args.engines / "manifest.json").is_file():
        print(f"error: no engine folder at {args.engines}; build with "
              "python export/build_engines.py --variant tiny", file=sys.stderr)  # fmt: skip
        return 2
    report = soak(
        args.engines,
        generations=args.generations,
        answers=args.answers,
        warmup=args.warmup,
        every=args.every,
        threads=args.threads,
        steps=args.steps,
        decoder_steps=args.decoder_steps,
        progress=not args.quiet,
    )
    print_table(report)
    out = args.out or common.scratch(f"soak-{args.engines.name}.json")
    common.write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
