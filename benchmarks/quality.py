"""What quality do built engines reach? mini-GenEval and understanding exact-match through the
runtime, for several engine folders side by side (e.g. fp32 vs INT8/FP8 Q/DQ).

    python benchmarks/quality.py --engines engines/tiny-fp32 engines/tiny-int8 --per-task 25

`--prompt TEXT` (default: the README's example) is also judged on its own, seeds 0-3, as the
mini-GenEval task its caption form belongs to (a relation caption: position).

Every image is judged twice: by GenEval's rules (`geneval`: an extra object passes) and strictly
(`strict`: exactly the asked objects and nothing else, as a person judges a picture;
`training.eval.geneval.check_strict`). The README quotes both.

The judge is the shapes-world evaluator of `training/eval` (numpy only); generation and answers
come from `runtime.Generator`, so this measures the engines users ship. Every folder runs the
same prompts, seeds, questions and `--threads` (default 1, recorded). Prints a table with each
folder's overall delta against the first folder, then writes JSON (`--out`, default
`benchmarks/out/quality.json`; a committed `benchmarks/results/` file only when `--out` names it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from runtime.generator import Generator  # noqa: E402
from training.data.shapes import parse_caption  # noqa: E402
from training.eval.geneval import (  # noqa: E402
    JUDGES,
    TASKS,
    Record,
    evaluate,
    make_prompts,
    score,
)
from training.eval.understanding import exact_match, make_questions  # noqa: E402

README_PROMPT = "a red circle to the left of a blue square"
PROMPT_SEEDS = (0, 1, 2, 3)
FORM_TASK = {"relation": "position", "pair": "color_attr", "count": "counting"}


def prompt_task(prompt: str) -> tuple[str, dict]:
    """The mini-GenEval task a caption is judged as, and its parsed spec."""
    spec = parse_caption(prompt)
    if spec["form"] == "single":
        return ("colors" if spec["objects"][0][0] else "single_object"), spec
    return FORM_TASK[spec["form"]], spec


def measure(
    folder: Path, *, per_task: int, questions: int, threads: int = common.DEFAULT_THREADS,
    prompt: str = README_PROMPT,
) -> dict:  # fmt: skip
    options = {"threads": threads}
    task, spec = prompt_task(prompt)
    start = time.perf_counter()
    with Generator.from_dir(folder, session_options=options) as gen:
        result = evaluate(lambda p, s: gen.generate(p, seed=s)[0], make_prompts(0, per_task))
        understanding = exact_match(
            lambda image, q: gen.answer(image, q, max_new_tokens=24), make_questions(0, questions)
        )
        images = [gen.generate(prompt, seed=s)[0] for s in PROMPT_SEEDS]
    records = result.pop("records")
    strict = score(  # the same images, judged strictly
        Record(r.task, r.prompt, r.seed, JUDGES["strict"](r.task, parse_caption(r.prompt), r.image),
               r.image)
        for r in records
    )  # fmt: skip
    passed = {name: [judge(task, spec, im) for im in images] for name, judge in JUDGES.items()}
    return {
        "engines": str(folder),
        "precision": gen.precision,
        "threads": threads,
        "geneval": result,
        "strict": strict,
        "understanding": understanding,
        "prompt": {"text": prompt, "task": task, "seeds": list(PROMPT_SEEDS), "passed": passed},
        "seconds": time.perf_counter() - start,
    }


def table(rows: list[dict]) -> str:
    head = f"{'engines':<28}" + "".join(f"{t[:9]:>10}" for t in TASKS) + f"{'overall':>9}"
    lines = [head + f"{'delta':>8}{'answer':>8}{'prompt':>8}"]
    base = {judge: rows[0][judge]["overall"] for judge in JUDGES}
    for r in rows:
        for judge in JUDGES:
            g, passed = r[judge], r["prompt"]["passed"][judge]
            lines.append(
                f"{Path(r['engines']).name + ' (' + judge + ')':<28}"
                + "".join(f"{g[t]:>10.3f}" for t in TASKS)
                + f"{g['overall']:>9.3f}{g['overall'] - base[judge]:>+8.3f}"
                + f"{r['understanding']['accuracy']:>8.3f}"
                + f"{sum(passed):>6d}/{len(passed)}"
            )
    lines.append(f"prompt: {rows[0]['prompt']['text']!r} judged as {rows[0]['prompt']['task']}, "
                 f"seeds {rows[0]['prompt']['seeds']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/quality.py", description=__doc__)
    parser.add_argument("--engines", type=Path, nargs="+", required=True)
    parser.add_argument("--per-task", type=int, default=25, help="mini-GenEval prompts per task")
    parser.add_argument("--questions", type=int, default=200, help="held-out questions")
    parser.add_argument(
        "--threads", type=common.threads_count, default=common.DEFAULT_THREADS,
        help="ONNX Runtime intra-op threads, every folder alike (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt", default=README_PROMPT, help="a caption also judged alone, seeds 0-3"
    )
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/out/quality.json)")
    args = parser.parse_args(argv)
    try:
        prompt_task(args.prompt)
    except ValueError as exc:
        print(f"error: --prompt: {exc}", file=sys.stderr)
        return 2
    missing = [str(f) for f in args.engines if not (f / "manifest.json").is_file()]
    if missing:
        print(
            f"error: no engine folder at {missing}; build with "
            "python export/build_engines.py --variant tiny [--precision int8]",
            file=sys.stderr,
        )
        return 2
    rows = [
        measure(
            f,
            per_task=args.per_task,
            questions=args.questions,
            threads=args.threads,
            prompt=args.prompt,
        )  # fmt: skip
        for f in args.engines
    ]
    print(table(rows))
    out = args.out or common.scratch("quality.json")
    common.write_json(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
