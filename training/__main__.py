"""`python -m training`: train the tiny model, export it as a checkpoint, evaluate a checkpoint.

python -m training train --stages all --out runs/tiny [--steps-scale 1.0] [--resume]
torchrun --nproc_per_node 2 -m training train --stages generation --out runs/tiny --resume
python -m training export-checkpoint --run runs/tiny --out checkpoints/tiny
python -m training eval --checkpoint checkpoints/tiny [--per-task 25] [--update-card]
python -m training decoder-ceiling --run runs/tiny [--per-task 25]
python -m training gate --run runs/tiny          # does stage 1's backbone read captions?
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

import torch


def train_command(
    *, stages: str, out: Path, steps_scale: float, resume: bool, seed: int, threads: int | None,
    jobs: int, evals: bool, wait_upstream: float, recorded_command: str | None,
    force_gate: bool = False,
) -> dict:  # fmt: skip
    from training.train.recipe import parse_stages, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, 2 // (world * jobs)))
    command = recorded_command or shlex.join(["python", "-m", "training", *sys.argv[1:]])
    if world > 1 and not recorded_command:
        command = f"torchrun --nproc_per_node {world} -m training {shlex.join(sys.argv[1:])}"
    return train(
        out=out, stages=parse_stages(stages), steps_scale=steps_scale, resume=resume, seed=seed,
        evals=evals, jobs=jobs, wait_upstream_s=wait_upstream, command=command,
        force_gate=force_gate,
    )  # fmt: skip


def gate_command(*, run: Path, out: Path | None, threads: int) -> bool:
    """Print the gate report of a run's finished stage 1; True when it passes."""
    import json

    from training.config import from_preset
    from training.tokenizer import build_tiny_tokenizer
    from training.train.common import Dist
    from training.train.gate import check_gate, format_gate, probe
    from training.train.run import Run, load_model
    from training.train.stages import DEFAULTS, KNOBS

    torch.set_num_threads(threads)
    if not (run / "understanding.pt").is_file():
        raise SystemExit(f"error: {run} has no understanding.pt (train stage 1 first)")
    r = Run(out=run, cfg=from_preset("tiny"), seed=0, dist=Dist(), resume=True,
            settings=DEFAULTS, knobs=KNOBS)  # fmt: skip
    report = probe(load_model(r, generation=False), build_tiny_tokenizer())
    report["passed"] = not check_gate(report)
    print(format_gate(report))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return report["passed"]


def export_command(*, run: Path, out: Path) -> Path:
    from training.train.publish import export_checkpoint

    return export_checkpoint(run, out)


def eval_command(
    *, checkpoint: Path, per_task: int, questions: int, out: Path | None, update_card: bool,
    threads: int, sampler: dict | None = None,
) -> dict:  # fmt: skip
    from training.checkpoint import load_pipeline
    from training.eval.geneval import MIN_PROMPTS_PER_TASK
    from training.train.evaluate import evaluate_pipeline, format_report
    from training.train.publish import update_card as write_card

    if per_task < 1 or questions < 1:
        raise ValueError(f"--per-task and --questions must be >= 1, got {per_task}, {questions}")
    if per_task < MIN_PROMPTS_PER_TASK:
        logging.warning("--per-task %d is below mini-GenEval's %d: a smoke, not the benchmark",
                        per_task, MIN_PROMPTS_PER_TASK)  # fmt: skip
    torch.set_num_threads(threads)
    out = out or Path("runs") / "eval" / Path(checkpoint).resolve().name
    pipe = load_pipeline(checkpoint)
    report = evaluate_pipeline(
        pipe, out, per_task=per_task, questions=questions, label=str(checkpoint), **(sampler or {})
    )
    text = format_report(report)
    print(text)
    print(f"wrote {out / 'eval.json'}, {out / 'geneval_grid.png'}")
    if update_card:
        sampler = ", ".join(f"{k} {v}" for k, v in report["sampler"].items())
        section = (
            f"Reference PyTorch pipeline, fp32 CPU; sampler: {sampler}. mini-GenEval: "
            f"{per_task} prompts per task x seeds 0-3 ({report['geneval_images']} judged images); "
            f"understanding: {questions} held-out questions.\n\n```\n{text}\n```"
        )
        write_card(checkpoint, section)
    return report


def ceiling_command(
    *, run: Path, per_task: int, out: Path | None, threads: int,
    decoder_steps: int | None = None, decoder_guidance: float | None = None,
) -> dict:  # fmt: skip
    import json

    from training.train.ceiling import decoder_ceiling, to_table

    torch.set_num_threads(threads)
    result = decoder_ceiling(
        run, per_task=per_task, decoder_steps=decoder_steps, decoder_guidance=decoder_guidance
    )
    print(to_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


def diagnose_command(
    *, run: Path | None, checkpoint: Path | None, per_task: int, out: Path, threads: int
) -> dict:
    from training.checkpoint import load_pipeline
    from training.pipeline import ReferencePipeline
    from training.train.diagnose import diagnose, to_text, write
    from training.train.publish import (
        TARGET_ENCODER_DIR,
        load_target_encoder_folder,
        open_run,
    )
    from training.train.run import load_decoder, load_model, load_target_encoder

    torch.set_num_threads(threads)
    opened = open_run(run) if run is not None else None
    if checkpoint is not None and (checkpoint / TARGET_ENCODER_DIR).is_dir():
        encoder, stats = load_target_encoder_folder(checkpoint / TARGET_ENCODER_DIR)
    elif opened is not None:
        encoder, stats = load_target_encoder(opened)
    else:
        raise SystemExit(f"error: {checkpoint} has no {TARGET_ENCODER_DIR}/; pass --run with "
                         "the run folder whose target encoder it was trained on")  # fmt: skip
    if checkpoint is not None:
        pipe = load_pipeline(checkpoint)
    else:
        model = load_model(opened, generation=True)
        pipe = ReferencePipeline(model, load_decoder(opened), opened.tokenizer)
    report = diagnose(pipe, encoder, stats, per_task=per_task)
    print(to_text(report))
    write(report, out)
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train stages of the tiny model into a run folder")
    p.add_argument(
        "--stages",
        default="all",
        help="all, or a comma list of target_encoder,decoder,understanding,generation",
    )
    p.add_argument("--out", type=Path, default=Path("runs/tiny"))
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: 2 cores shared by all processes)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        choices=[1, 2],
        help="2: train understanding+generation in a second process, concurrently",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the periodic evaluations")
    p.add_argument(
        "--force-gate", action="store_true",
        help="start stage 2 even when stage 1's backbone fails the caption-reading gate",
    )  # fmt: skip
    p.add_argument("--wait-upstream", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--recorded-command", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("gate", help="caption-reading probe of stage 1's backbone (exit 1: fails)")
    p.add_argument("--run", type=Path, required=True, help="run folder with a finished stage 1")
    p.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--threads", type=int, default=2)

    p = sub.add_parser("export-checkpoint", help="write a run as a published-layout checkpoint")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("eval", help="mini-GenEval + understanding exact-match of a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--per-task", type=int, default=25, help="mini-GenEval prompts per task")
    p.add_argument("--questions", type=int, default=200, help="held-out understanding questions")
    p.add_argument("--out", type=Path, default=None, help="default runs/eval/<checkpoint name>")
    p.add_argument("--update-card", action="store_true", help="write figures into MODEL_CARD.md")
    p.add_argument("--threads", type=int, default=2)
    for name, kind in (("steps", int), ("guidance", float), ("decoder-steps", int),
                       ("decoder-guidance", float)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, default=None, help="default: the checkpoint's")

    p = sub.add_parser(
        "decoder-ceiling",
        help="mini-GenEval of a run's VAE and decoder from true target features (no DiT)",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder with a finished decoder")
    p.add_argument("--per-task", type=int, default=25, help="mini-GenEval prompts per task")
    p.add_argument("--decoder-steps", type=int, default=None, help="default: the sampler's")
    p.add_argument("--decoder-guidance", type=float, default=None, help="default: the sampler's")
    p.add_argument("--out", type=Path, default=None, help="also write the scores as JSON here")
    p.add_argument("--threads", type=int, default=2)

    p = sub.add_parser(
        "diagnose",
        help="where generation fails: failure kinds, target-token probes, the DiT's features, "
        "the decoder's tolerance of feature noise",
    )
    p.add_argument(
        "--run",
        type=Path,
        default=None,
        help="run folder with a trained target "
        "encoder (and, without --checkpoint, a finished decoder and generation stage)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="diagnose this published checkpoint's DiT and decoder instead of the run's",
    )
    p.add_argument("--per-task", type=int, default=12, help="mini-GenEval prompts per task")
    p.add_argument("--out", type=Path, required=True, help="report JSON (a .txt table beside it)")
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "train":
        train_command(stages=args.stages, out=args.out, steps_scale=args.steps_scale,
                      resume=args.resume, seed=args.seed, threads=args.threads, jobs=args.jobs,
                      evals=not args.no_eval, wait_upstream=args.wait_upstream,
                      recorded_command=args.recorded_command,
                      force_gate=args.force_gate)  # fmt: skip
    elif args.command == "gate":
        sys.exit(0 if gate_command(run=args.run, out=args.out, threads=args.threads) else 1)
    elif args.command == "export-checkpoint":
        print(export_command(run=args.run, out=args.out))
    elif args.command == "diagnose":
        if args.run is None and args.checkpoint is None:
            parser.error("diagnose needs --run, --checkpoint or both")
        diagnose_command(run=args.run, checkpoint=args.checkpoint, per_task=args.per_task,
                         out=args.out, threads=args.threads)  # fmt: skip
    elif args.command == "decoder-ceiling":
        ceiling_command(run=args.run, per_task=args.per_task, out=args.out, threads=args.threads,
                        decoder_steps=args.decoder_steps,
                        decoder_guidance=args.decoder_guidance)  # fmt: skip
    else:
        names = ("steps", "guidance", "decoder_steps", "decoder_guidance")
        eval_command(checkpoint=args.checkpoint, per_task=args.per_task, questions=args.questions,
                     out=args.out, update_card=args.update_card, threads=args.threads,
                     sampler={k: getattr(args, k) for k in names})  # fmt: skip


if __name__ == "__main__":
    main()
