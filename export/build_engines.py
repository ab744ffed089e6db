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
files it lists.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("onnx_ir", "onnxscript", "torch", "modelopt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
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


if __name__ == "__main__":
    sys.exit(main())
