"""The quality/latency frontier of the samplers: mini-GenEval against model forwards per image.

    python benchmarks/frontier.py --engines engines/tiny-fp32 [--per-task 16] [--seeds 2]

For BLIP3-o's default (30 DiT + 50 UNet Euler steps) and a grid of fewer-step settings (the DiT
at fewer Euler steps, with Heun or with LMS; the decoder at fewer Euler steps or with
DPM-Solver++ 2M),
side by side in one run on the same prompts and seeds: mini-GenEval overall and per task through
the runtime (`runtime.Generator`, the engines users ship), DiT and UNet forwards per image (CFG
batch 2: two per call), wall and CPU seconds per image here, and from the same call counts the
roofline's projected 4b time per image on H100, H200 and Orin at 16-bit and 8-bit
(benchmarks/roofline.py: a lower bound, not a measurement). The "fast" pick is the setting with
the fewest forwards whose overall is within `--tolerance` (0.03) of the default's; the folder's
`sampler.presets.fast` is compared with it.

Every setting runs through one Generator at `--threads` (default 1, recorded), so the seconds
compare like with like. Prints the table, then writes JSON (`--out`, default
`benchmarks/out/frontier-<variant>.json`; the committed `benchmarks/results/frontier-tiny.json`
only when `--out` names it) and the chart of quality vs forwards (`--chart`, default beside the
JSON; needs matplotlib, skipped with a note without it; `--no-chart`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, roofline  # noqa: E402
from runtime.generator import Generator  # noqa: E402
from runtime.jobs.samplers import decoder_plan, flow_plan  # noqa: E402
from training.eval.geneval import TASKS, evaluate, make_prompts  # noqa: E402

# (DiT sampler, DiT steps, decoder sampler, decoder steps); the default first
GRID = (
    ("euler", 30, "euler", 50),
    ("euler", 30, "euler", 20),
    ("euler", 30, "dpmpp_2m", 20),
    ("euler", 30, "dpmpp_2m", 10),
    ("euler", 30, "euler", 10),
    ("euler", 15, "euler", 50),
    ("heun", 8, "euler", 50),
    ("lms", 15, "euler", 50),
    ("euler", 15, "dpmpp_2m", 20),
    ("lms", 15, "dpmpp_2m", 20),
    ("lms", 15, "dpmpp_2m", 10),
    ("lms", 15, "euler", 10),
    ("lms", 12, "dpmpp_2m", 10),
    ("lms", 10, "dpmpp_2m", 10),
)
DEVICES = ("h100-sxm", "h200", "orin-agx-64")
PRECISIONS = ("16-bit", "8-bit")
BLIP3O_REPORTED_S = 2.0  # the authors' ~2 s per 4b image on an H100 (30 + 50 Euler steps)


def setting(sampler: str, steps: int, decoder_sampler: str, decoder_steps: int) -> dict:
    return {
        "sampler": sampler,
        "steps": steps,
        "decoder_sampler": decoder_sampler,
        "decoder_steps": decoder_steps,
    }


DEFAULT = setting("euler", 30, "euler", 50)


def label(s: dict) -> str:
    return f"{s['sampler']}{s['steps']}+{s['decoder_sampler']}{s['decoder_steps']}"


def parse_setting(text: str) -> dict:
    """`euler:30,dpmpp_2m:20` -> a setting (DiT sampler:steps, decoder sampler:steps)."""
    try:
        dit, dec = text.split(",")
        (a, n), (b, m) = dit.split(":"), dec.split(":")
        return setting(a, int(n), b, int(m))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"setting {text!r}: expected DIT_SAMPLER:STEPS,DECODER_SAMPLER:STEPS "
            "(e.g. euler:15,dpmpp_2m:20)"
        ) from None


def calls(s: dict, decoder_config: dict) -> tuple[int, int]:
    """(dit_step calls, unet_step calls) per image."""
    flow = flow_plan(s["sampler"], s["steps"])
    dec = decoder_plan(s["decoder_sampler"], s["decoder_steps"], decoder_config)
    return len(flow.calls), len(dec.calls)


def projected(variant: str, dit_calls: int, unet_calls: int) -> dict[str, float]:
    """The roofline's per-image lower bound (seconds) with these call counts."""
    graphs = [
        dataclasses.replace(
            g,
            calls_per_image={"dit_step": dit_calls, "unet_step": unet_calls}.get(
                g.name, g.calls_per_image
            ),
        )
        for g in roofline.graph_costs(variant)
    ]
    return {
        f"{dev}/{prec}": roofline.image_bound(graphs, roofline.DEVICES[dev], prec)["total"]
        for dev in DEVICES
        for prec in PRECISIONS
    }


def measure(gen: Generator, s: dict, prompts, variant: str) -> dict:
    n_images = len(prompts)
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate(lambda p, seed: gen.generate(p, seed=seed, **s)[0], prompts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result.pop("records")
    dit_calls, unet_calls = calls(s, gen.config["decoder"])
    return {
        "setting": s,
        "label": label(s),
        "geneval": result,
        "dit_forwards": 2 * dit_calls,
        "unet_forwards": 2 * unet_calls,
        "forwards": 2 * (dit_calls + unet_calls),
        "images": n_images,
        "wall_s_per_image": wall / n_images,
        "cpu_s_per_image": cpu / n_images,
        "projected_s": projected(variant, dit_calls, unet_calls),
    }


def pick_fast(rows: list[dict], tolerance: float) -> dict:
    """The fewest forwards (then the best overall) within `tolerance` of the first row."""
    base = rows[0]["geneval"]["overall"]
    ok = [r for r in rows if r["geneval"]["overall"] >= base - tolerance]
    return min(ok, key=lambda r: (r["forwards"], -r["geneval"]["overall"]))


def table(rows: list[dict], fast: dict, variant: str) -> str:
    head = f"{'setting':<24}{'DiT':>5}{'UNet':>6}" + "".join(f"{t[:8]:>9}" for t in TASKS)
    head += f"{'overall':>9}{'delta':>8}{'cpu s':>7}" + f"{'H100 16b':>10}{'H100 8b':>9}"
    head += f"{'Orin 8b':>9}"
    lines = [head]
    base = rows[0]["geneval"]["overall"]
    for r in rows:
        g, p = r["geneval"], r["projected_s"]
        mark = " <- fast" if r is fast else ""
        lines.append(
            f"{r['label']:<24}{r['dit_forwards']:>5}{r['unet_forwards']:>6}"
            + "".join(f"{g[t]:>9.3f}" for t in TASKS)
            + f"{g['overall']:>9.3f}{g['overall'] - base:>+8.3f}{r['cpu_s_per_image']:>7.2f}"
            + f"{p['h100-sxm/16-bit']:>10.3f}{p['h100-sxm/8-bit']:>9.3f}"
            + f"{p['orin-agx-64/8-bit']:>9.2f}{mark}"
        )
    lines.append(
        f"projected {variant} seconds per image are roofline lower bounds; BLIP3-o reports "
        f"~{BLIP3O_REPORTED_S:g} s on an H100 for its default"
    )
    return "\n".join(lines)


def chart(rows: list[dict], fast: dict, tolerance: float, path: Path) -> None:
    import matplotlib.pyplot as plt  # through common.save_chart: matplotlib is there, on Agg

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        color = "tab:red" if r is fast else ("black" if r is rows[0] else "tab:blue")
        ax.scatter(r["forwards"], r["geneval"]["overall"], color=color)
        ax.annotate(r["label"], (r["forwards"], r["geneval"]["overall"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))  # fmt: skip
    base = rows[0]["geneval"]["overall"]
    ax.axhline(base - tolerance, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("model forwards per image (DiT + UNet, CFG batch 2)")
    ax.set_ylabel("mini-GenEval overall")
    ax.set_title("sampler frontier (black: the baseline, red: the fast pick)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/frontier.py", description=__doc__)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--per-task", type=int, default=16, help="mini-GenEval prompts per task")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt draw")
    parser.add_argument(
        "--setting", type=parse_setting, action="append",
        help="a setting to measure (repeatable; default: the built-in grid), e.g. "
        "euler:15,dpmpp_2m:20; the baseline is always measured first",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", type=parse_setting, default=DEFAULT,
        help="the setting others are judged against (default: BLIP3-o's euler:30,euler:50)",
    )  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--variant", default="4b", choices=("4b", "8b"), help="for projections")
    parser.add_argument(
        "--threads", type=common.threads_count, default=common.DEFAULT_THREADS,
        help="ONNX Runtime intra-op threads, every setting alike (default 1)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/out/frontier-<variant>)")
    parser.add_argument("--chart", type=Path, help="PNG (default: beside the JSON)")
    parser.add_argument("--no-chart", action="store_true", help="table and JSON only")
    args = parser.parse_args(argv)
    if not (args.engines / "manifest.json").is_file():
        print(
            f"error: no engine folder at {args.engines}; build with "
            "python export/build_engines.py --variant tiny",
            file=sys.stderr,
        )
        return 2
    if args.per_task < 1:
        print(f"error: --per-task must be >= 1, got {args.per_task}", file=sys.stderr)
        return 2
    grid = args.setting or [setting(*g) for g in GRID]
    settings = [args.baseline] + [s for s in grid if s != args.baseline]
    prompts = make_prompts(args.prompt_seed, args.per_task)
    options = {"threads": args.threads}
    rows = []
    with Generator.from_dir(args.engines, session_options=options) as gen:
        for s in settings:
            gen.params(**s)  # a bad setting is one clear error before anything runs
        preset = gen.manifest["sampler"].get("presets", {}).get("fast")
        folder_variant = gen.manifest["variant"]
        for i, s in enumerate(settings):
            rows.append(measure(gen, s, prompts, args.variant))
            r = rows[-1]
            print(
                f"[{i + 1}/{len(settings)}] {r['label']}: overall {r['geneval']['overall']:.3f}, "
                f"{r['forwards']} forwards, {r['cpu_s_per_image']:.2f} cpu s/image",
                flush=True,
            )
    fast = pick_fast(rows, args.tolerance)
    result = {
        "engines": str(args.engines),
        "prompts": {"seed": args.prompt_seed, "per_task": args.per_task, "images": len(prompts)},
        "tolerance": args.tolerance,
        "baseline": args.baseline,
        "variant": args.variant,
        "threads": args.threads,
        "blip3o_reported_s": BLIP3O_REPORTED_S,
        "rows": rows,
        "fast": fast["setting"],
        "folder_fast_preset": preset,
    }
    print(table(rows, fast, args.variant))
    print(f"fast pick: {fast['label']}; the folder's fast preset: {preset}")
    out = args.out or common.scratch(f"frontier-{folder_variant}.json")
    common.write_json(out, result)
    print(f"wrote {out}")
    if not args.no_chart:
        draw = lambda path: chart(rows, fast, args.tolerance, path)  # noqa: E731
        common.save_chart(draw, args.chart or out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
