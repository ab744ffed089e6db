"""Build an engine folder: every graph to ONNX, INT8/FP8 Q/DQ, TensorRT engines, one manifest.

    python export/build_engines.py --variant tiny
    python export/build_engines.py --variant 4b --checkpoint /models/BLIP3o-Model-4B \\
        --precision auto --backend tensorrt

Stages (host assets, export of each graph, quantization, TensorRT engines) are keyed on content
(checkpoint hash, precision, tool versions, our exporter's source, compute capability, profiles),
so a second run with the same inputs does nothing, and an interrupted run keeps what it finished.
`--dry-run` prints the plan with each stage's estimated peak memory and disk and the calibration's
cost. A checkpoint is checked (config, file headers and sizes, keys, decoder, tokenizer) before
the output folder is made. The runtime reads nothing of the folder but the manifest and the
files it lists. The terminal shows one progress bar per stage and each warning once; the build
log beside the folder (`engines/<folder>.build.log`) keeps everything, the exporters' and
quantizers' own output included. Errors are one line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build_log import TerminalFilter  # noqa: E402
from export.build_plan import (  # noqa: E402
    BACKENDS,
    DECODER_SCHEDULER,
    DEVICES,
    PRECISION_CHOICES,
    VARIANTS,
    BuildRequest,
    build,
)
from runtime.errors import UserError  # noqa: E402
from runtime.folder.graphs import GRAPHS, RUNTIME_GRAPHS  # noqa: E402
from runtime.folder.schema import DECODER_NEGATIVES  # noqa: E402

log = logging.getLogger("build_engines")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class TerminalFormatter(logging.Formatter):
    """The plan's INFO lines as they are; warnings and errors say their level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname.lower()}: {record.name}: {record.getMessage()}"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="python export/build_engines.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--variant", required=True, choices=VARIANTS, help="model variant")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="BLIP3-o checkpoint folder (published layout); tiny defaults to the shipped one",
    )
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES)
    parser.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    parser.add_argument(
        "--out", type=Path, help="engine folder (default engines/<variant>-<precision>)"
    )
    parser.add_argument(
        "--graphs",
        nargs="+",
        choices=GRAPHS,
        metavar="GRAPH",
        help=f"graphs to build (default: the runtime's {' '.join(RUNTIME_GRAPHS)}; "
        f"all: {' '.join(GRAPHS)})",
    )
    parser.add_argument(
        "--calibration-prompts",
        type=Path,
        help="prompt file for INT8/FP8 calibration (one per line; default: shapes-world prompts)",
    )
    parser.add_argument(
        "--calibration-steps",
        nargs=2,
        type=int,
        metavar=("DIT", "UNET"),
        help="sampler steps while calibrating (default: the sampler's 30 and 50)",
    )
    parser.add_argument(
        "--calibration-count",
        type=int,
        metavar="N",
        help="calibrate on at most N prompts (default: all of the file, or 32 shapes-world ones)",
    )
    parser.add_argument(
        "--calibration-samples",
        type=int,
        metavar="N",
        help="the quantizer calibrates each graph on at most N of the recorded calls, spread "
        "over every step and prompt (default: 256)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="intra-op threads of torch and ONNX Runtime (default: 1 for tiny, whose small ops "
        "run as fast on one; the libraries' own for 4b/8b)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="device of the PyTorch calibration runs (auto: cuda when torch sees a GPU)",
    )
    parser.add_argument(
        "--decoder-scheduler",
        default="check",
        choices=DECODER_SCHEDULER,
        help="the checkpoint's diffusion-decoder scheduler config vs the preset: check (stop on "
        "a difference), checkpoint (build with the file's values) or preset (keep the preset's)",
    )
    parser.add_argument(
        "--decoder-negative",
        choices=DECODER_NEGATIVES,
        help="the decoder's CFG negative: blank_prompt (the DiT's features of the blank prompt, "
        "BLIP3-o as published) or zeros (what a decoder trained with zeroed conditions saw); "
        "default: the checkpoint config's (blank_prompt for 4b/8b, zeros for tiny)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        metavar="N",
        help="reduced depth: the variant's real widths with N layers per stack (tests, memory "
        "checks; a checkpoint written so, or --random-weights)",
    )
    parser.add_argument(
        "--static-batch",
        type=int,
        metavar="B",
        help="TensorRT only: pin the generation graphs' batch to B images (engines captured into "
        "CUDA graphs on their first run, then replayed; every call takes exactly B images)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild every stage")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="seeded random weights instead of a checkpoint (true shapes, for latency work)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="every INFO line on the terminal too"
    )
    args = parser.parse_args(argv)
    root = logging.getLogger()
    level, handler = root.level, _terminal_logging(quiet=args.quiet, verbose=args.verbose)
    try:
        return _build(args)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _build(args: argparse.Namespace) -> int:
    request = BuildRequest(
        variant=args.variant,
        checkpoint=args.checkpoint,
        precision=args.precision,
        backend=args.backend,
        out=args.out,
        graphs=tuple(args.graphs) if args.graphs else None,
        calibration_prompts=args.calibration_prompts,
        calibration_steps=tuple(args.calibration_steps) if args.calibration_steps else None,
        calibration_count=args.calibration_count,
        calibration_samples=args.calibration_samples,
        threads=args.threads,
        layers=args.layers,
        decoder_scheduler=args.decoder_scheduler,
        decoder_negative=args.decoder_negative,
        device=args.device,
        force=args.force,
        dry_run=args.dry_run,
        seed=args.seed,
        random_weights=args.random_weights,
        static_batch=args.static_batch,
        progress=not args.quiet,
    )
    try:
        folder = build(request)
    except UserError as err:  # BuildError, EngineFolderError: the user can fix it
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run again to resume", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, permissions: the stage's temporary files are gone
        print(f"error: {err}; finished stages are kept, run again to resume", file=sys.stderr)
        return 1
    if not args.dry_run:
        print(f"engine folder ready: {folder}")
    return 0


def _terminal_logging(*, quiet: bool, verbose: bool) -> logging.Handler:
    """One stderr handler: the build plan's INFO lines (all INFO with `verbose`, none with
    `quiet`), our warnings, each message once (`export.build_log.TerminalFilter`)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TerminalFormatter())
    handler.addFilter(TerminalFilter(verbose=verbose))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("onnx_ir", "onnxscript", "torch", "modelopt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


if __name__ == "__main__":
    sys.exit(main())
