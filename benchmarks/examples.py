"""Which seeds draw the README's example prompts right, judged as a person would?

    python benchmarks/examples.py --engines engines/tiny-fp32                  # table, scratch
    python benchmarks/examples.py --engines engines/tiny-fp32 --out docs       # the README's grid

Every prompt the README and the server examples use is generated through the runtime at seeds
0..N-1 (the folder's default sampler) and judged strictly (`check_strict`: exactly the asked
objects, nothing extra) and by GenEval's rules. The table says, per prompt, which seeds are right;
the README's examples use a right seed and say how many of seeds 0-3 are right. Writes
`examples.json` and `examples.png` (a grid framed green / red by the strict judge) under `--out`
(default `benchmarks/out/`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.quality import prompt_task  # noqa: E402
from runtime.generator import Generator  # noqa: E402
from training.eval.geneval import JUDGES, Record, save_grid  # noqa: E402

# The prompts the README and its server / Python examples show, in the order they appear.
PROMPTS = (
    "a red circle to the left of a blue square",
    "a red circle",
    "two blue squares",
    "a yellow square above a purple circle",
    "a green triangle and a blue circle",
)


def measure(folder: Path, prompts, seeds: int, threads: int) -> dict:
    rows = []
    records = []
    with Generator.from_dir(folder, session_options={"threads": threads}) as gen:
        for prompt in prompts:
            task, spec = prompt_task(prompt)
            row = {"prompt": prompt, "task": task, "seeds": {}}
            for seed in range(seeds):
                image = np.asarray(gen.generate(prompt, seed=seed)[0])
                verdict = {name: bool(judge(task, spec, image)) for name, judge in JUDGES.items()}
                row["seeds"][seed] = verdict
                records.append(Record(task, prompt, seed, verdict["strict"], image))
            rows.append(row)
        sampler = {k: gen.folder.sampler[k] for k in ("sampler", "steps", "decoder_sampler",
                                                      "decoder_steps", "guidance")}  # fmt: skip
    return {"engines": str(folder), "threads": threads, "sampler": sampler, "prompts": rows,
            "records": records}  # fmt: skip


def table(result: dict) -> str:
    lines = [f"{'prompt':<44} {'task':<12} {'strict: right seeds':<22} {'geneval':<8}"]
    for row in result["prompts"]:
        strict = [s for s, v in row["seeds"].items() if v["strict"]]
        loose = sum(v["geneval"] for v in row["seeds"].values())
        n = len(row["seeds"])
        first4 = sum(row["seeds"][s]["strict"] for s in list(row["seeds"])[:4])
        lines.append(
            f"{row['prompt']:<44} {row['task']:<12} "
            f"{(str(strict) + f' ({first4}/4 of 0-3)'):<22} {loose}/{n}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/examples.py", description=__doc__)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 per prompt (8)")
    parser.add_argument("--prompt", action="append", help="prompts (default: the README's)")
    parser.add_argument(
        "--threads", type=common.threads_count, default=common.DEFAULT_THREADS,
        help="ONNX Runtime intra-op threads (default 1)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for examples.json / .png")
    args = parser.parse_args(argv)
    if not (args.engines / "manifest.json").is_file():
        print(f"error: no engine folder at {args.engines}; build with "
              "python export/build_engines.py --variant tiny", file=sys.stderr)  # fmt: skip
        return 2
    prompts = args.prompt or PROMPTS
    try:
        for prompt in prompts:
            prompt_task(prompt)
    except ValueError as exc:
        print(f"error: --prompt: {exc}", file=sys.stderr)
        return 2
    result = measure(args.engines, prompts, args.seeds, args.threads)
    print(table(result))
    out = args.out or common.SCRATCH
    records = result.pop("records")
    common.write_json(out / "examples.json", result)
    save_grid(records, out / "examples.png", cols=args.seeds)
    print(f"wrote {out / 'examples.json'} and {out / 'examples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
