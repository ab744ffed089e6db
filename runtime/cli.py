"""`python -m runtime generate|answer|doctor|serve`: the runtime from the command line.

    python -m runtime generate "a red circle" --engines engines/tiny-fp32 --out out.png
    python -m runtime answer out.png "Describe the image." --engines engines/tiny-fp32
    python -m runtime doctor --engines engines/tiny-fp32 [--json]

The sampling options are derived from the params objects (`GeneratorParams` for `generate`,
`AnswerParams` for `answer`): one option per field, typed and ranged by the dataclass, the ranges
an engine folder narrows (images per call) read from the folder named by `--engines`. Each
written image's line says its seed, and a PNG carries its prompt, seed, sampler settings and
engine folder in its text chunks (`runtime.jobs.provenance`), so any image can be made again.

User errors (`runtime.errors.UserError`: bad arguments, a missing or corrupt engine folder, an
unreadable image, an output path that cannot be written) print one line and exit with status 2;
a result that is not a number (NaN/inf) prints one line and exits with 1; anything else is a bug
and keeps its traceback. Output paths are checked before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from runtime import __version__, validate
from runtime.errors import ResultError, UserError
from runtime.folder.manifest import VERIFY_MODES
from runtime.params import AnswerParams, GeneratorParams
from runtime.params import add_arguments as add_params_arguments
from runtime.params import from_arguments as params_from_arguments
from runtime.sessions import BACKENDS

ENGINES_ENV = "BLIP3O_ENGINES"
_TINY = Path("engines") / "tiny-fp32"


def default_engines() -> Path:
    """`$BLIP3O_ENGINES`, else `engines/tiny-fp32` under the working folder, else the one the
    README's main command builds in this checkout (beside the `runtime` package)."""
    if os.environ.get(ENGINES_ENV):
        return Path(os.environ[ENGINES_ENV])
    if _TINY.is_dir():
        return _TINY
    beside = Path(__file__).resolve().parents[1] / _TINY
    return beside if beside.is_dir() else _TINY


def folder_ranges(engines: Path | None) -> dict:
    """The option ranges an engine folder narrows (`num_images`: its graphs' batch), for the
    help text; {} when the folder cannot be read (the command itself says why, later)."""
    from runtime.folder.engine_folder import EngineFolder

    try:
        low, high = EngineFolder(engines).batch_range()
    except Exception:  # any unreadable folder: the generic ranges
        return {}
    return {"num_images": (low, high)}


def _open(args):
    from runtime.generator import Generator

    if args.threads is not None:
        validate.integer("--threads", args.threads, 1, 1024)
    options = {"threads": args.threads} if args.threads and args.backend == "onnxruntime" else None
    return Generator.from_dir(
        args.engines,
        backend=args.backend,
        device=args.device,
        low_memory=args.low_memory,
        verify=args.verify,
        session_options=options,
    )


def _progress_bar(total: int):
    from tqdm import tqdm  # tqdm is light; fall back to no bar if it is absent

    return tqdm(total=total, unit="step", leave=False)


def output_paths(out: Path, count: int) -> list[Path]:
    """Where `count` images go (`out`, or `out-0`, `out-1`...), refused up front with a
    `UserError` when they cannot be written: no folder, not writable, a folder in the way, or an
    image format PIL cannot write."""
    from PIL import Image

    out = Path(out)
    Image.init()
    if out.suffix.lower() not in Image.EXTENSION:
        raise UserError(f"--out {out}: unknown image extension {out.suffix!r}; use .png or .jpg")
    if Image.EXTENSION[out.suffix.lower()] not in Image.SAVE:
        raise UserError(f"--out {out}: PIL cannot write {out.suffix!r} images; use .png")
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder {parent} is not writable")
    paths = (
        [out]
        if count == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
    )
    for path in paths:
        if path.is_dir():
            raise UserError(f"--out {out}: {path} is a folder")
        if path.exists() and not os.access(path, os.W_OK):
            raise UserError(f"--out {out}: {path} exists and is not writable")
    return paths


def cmd_generate(args) -> int:
    from runtime.jobs.provenance import image_info, save_image

    timings: dict[str, float] = {}
    params = params_from_arguments(args)  # checked before any work, like the output paths
    validate.text("prompt", args.prompt)
    paths = output_paths(args.out, params.num_images)
    with _open(args) as gen:
        job = gen.start(args.prompt, params)  # warns of words the model does not know
        bar = _bar_or_none(job.total, args.quiet)
        while not job.done:
            start = time.perf_counter()
            stage = job.step()
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
            if bar is not None:
                bar.set_description(stage)
                bar.update(1)
        if bar is not None:
            bar.close()
        images = job.result()
        info = image_info(job)
    for image, path in zip(images, paths):
        try:
            save_image(image, path, info)
        except OSError as err:  # disk full, or the folder changed since the check
            raise UserError(f"cannot write {path}: {err}") from err
        print(f"{path}\tseed={job.params.seed}")
    if args.timings:
        for stage, seconds in timings.items():
            print(f"{stage:<12} {seconds * 1000:9.1f} ms")
        print(f"{'total':<12} {sum(timings.values()) * 1000:9.1f} ms")
    return 0


def _bar_or_none(total: int, quiet: bool):
    if quiet:
        return None
    try:
        return _progress_bar(total)
    except ImportError:
        return None


def cmd_answer(args) -> int:
    params = params_from_arguments(args, AnswerParams)  # checked before opening anything
    validate.text("question", args.question)
    with _open(args) as gen:
        start = time.perf_counter()
        if args.stream:
            gen.answer(
                args.image, args.question, params, stream=lambda s: print(s, end="", flush=True)
            )
            print()
        else:
            print(gen.answer(args.image, args.question, params))
        if args.timings:
            print(f"answer: {(time.perf_counter() - start) * 1000:.1f} ms")
    return 0


def cmd_doctor(args) -> int:
    import json

    from runtime.machine.doctor import format_text, report
    from runtime.machine.probe import machine_facts

    data = report(machine_facts(), args.engines)
    print(json.dumps(data, indent=2) if args.json else format_text(data))
    return 0 if data["ok"] else 1


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(ranges: dict | None = None) -> argparse.ArgumentParser:
    """The CLI; `ranges` narrows options' shown ranges to an engine folder's (`folder_ranges`)."""
    parser = Parser(prog="python -m runtime", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"blip3o-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    common = Parser(add_help=False)
    common.add_argument(
        "--engines",
        type=Path,
        default=default_engines(),
        help=f"engine folder (default: ${ENGINES_ENV}, else %(default)s)",
    )
    common.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    common.add_argument(
        "--device",
        help="cpu, cuda or tensorrt (ORT's EP); default: cuda for --backend tensorrt, else cpu",
    )
    common.add_argument("--low-memory", action="store_true", help="one stage's sessions at a time")
    common.add_argument(
        "--verify",
        default="fast",
        choices=VERIFY_MODES,
        help="check the folder's files at open: fast (sizes; full once after a build), full "
        "(sha256 of every file: tens of GB at 4b), none",
    )
    common.add_argument("--timings", action="store_true", help="print per-stage times")
    common.add_argument("--threads", type=int, help="intra-op threads per ONNX Runtime session")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", parents=[common], help="text to image")
    g.add_argument("prompt")
    g.add_argument("--out", default="out.png", help="output image (suffixed -i for several)")
    add_params_arguments(g, GeneratorParams, ranges=ranges)  # one option per field
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("answer", parents=[common], help="answer a question about an image")
    a.add_argument("image", type=Path)
    a.add_argument("question")
    add_params_arguments(a, AnswerParams)  # one option per field
    a.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    a.set_defaults(func=cmd_answer)

    d = sub.add_parser(
        "doctor", help="what this machine runs, and whether an engine folder loads here"
    )
    d.add_argument("--engines", type=Path, help="engine folder to judge (default: none)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_doctor)

    from runtime.server.cli import add_parser as add_serve  # imports no web framework

    add_serve(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(levelname)s: %(message)s")  # the runtime's warnings, one line
    ranges = folder_ranges(_engines_of(argv)) if {"-h", "--help"} & set(argv) else {}
    args = build_parser(ranges).parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except ResultError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _engines_of(argv: list[str]) -> Path:
    """The `--engines` an argument list names (the default when none)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engines", type=Path, default=default_engines())
    return pre.parse_known_args(argv)[0].engines


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
