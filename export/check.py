"""Check an engine folder: files against the manifest, every graph run at its profile's ends.

    python export/check.py engines/tiny-fp32 [--graphs dit_step unet_step]

Each graph runs through polygraphy's ONNX Runtime runner on inputs drawn from its spec at the
min, opt and max sizes of its profile; outputs must have the shapes the spec promises and be
finite. Where TensorRT and the folder's engines are present, polygraphy's TensorRT runner runs
too and the two are compared (`--atol/--rtol`); each engine is read once and checked against the
manifest's sha256 before it is deserialized, as the runtime's session does. Exit status 0 when
every check passes, 1 when one fails, 2 for a bad folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from export.onnx_export import expected_output_shapes  # noqa: E402
from runtime.folder.manifest import (  # noqa: E402
    EngineFolderError,
    file_path,
    graph_spec,
    read_manifest,
    verify_file,
)
from runtime.folder.spec import profile_sizes, sample_inputs  # noqa: E402
from runtime.sessions.trt_rules import check_engine_bytes  # noqa: E402

log = logging.getLogger("check")


def engine_bytes(folder: Path, entry: dict, manifest: dict) -> bytes:
    """A graph's engine file, read once and checked against the manifest's sha256 before
    anything deserializes it (a TensorRT plan is code the GPU runs), as the session does."""
    path = file_path(folder, entry["engine"])
    if not path.is_file():
        raise EngineFolderError(f"{path} is listed in the manifest but missing")
    data = path.read_bytes()
    check_engine_bytes(data, entry, path, manifest)
    return data


def _runners(folder: Path, entry: dict, use_trt: bool, manifest: dict) -> list:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    runners = [OnnxrtRunner(SessionFromOnnx(str(folder / entry["file"])))]
    if use_trt and "engine" in entry:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        data = engine_bytes(folder, entry, manifest)  # deserialized from the checked bytes
        runners.append(TrtRunner(EngineFromBytes(data)))
    return runners


def check_folder(
    folder: Path, graphs: list[str] | None = None, *, atol: float = 1e-2, rtol: float = 1e-2
) -> list[tuple[str, str, bool, str]]:
    """Run the checks; returns rows (graph, case, passed, detail)."""
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    manifest = read_manifest(folder)
    for entry in manifest.get("host", {}).values():
        verify_file(folder, entry, manifest)
    try:
        import tensorrt  # noqa: F401

        use_trt = True
    except ImportError:
        use_trt = False
    rows = []
    for name in graphs or list(manifest["graphs"]):
        entry = manifest["graphs"][name] if name in manifest["graphs"] else None
        spec = graph_spec(manifest, name)  # raises a clear error for an unknown graph
        verify_file(folder, entry, manifest)
        precision = manifest["precision"]
        feeds = [
            sample_inputs(spec, profile_sizes(spec, which), precision=precision, seed=i)
            for i, which in enumerate(("min", "opt", "max"))
        ]
        runners = _runners(folder, entry, use_trt, manifest)
        results = Comparator.run(runners, data_loader=feeds)
        for runner_name, outputs in results.items():
            for case, (feed, out) in zip(("min", "opt", "max"), zip(feeds, outputs)):
                want = expected_output_shapes(spec, feed)
                bad = [k for k, shape in want.items() if tuple(out[k].shape) != shape]
                nonfinite = [
                    k for k in want if not np.isfinite(np.asarray(out[k], np.float32)).all()
                ]
                ok = not bad and not nonfinite
                detail = "ok" if ok else f"shape mismatch {bad}, non-finite {nonfinite}"
                rows.append((name, f"{runner_name.split('-')[0]} {case}", ok, detail))
        if len(runners) > 1:
            compare = CompareFunc.simple(atol=atol, rtol=rtol)
            ok = bool(Comparator.compare_accuracy(results, compare_func=compare))
            rows.append((name, "onnxrt vs trt", ok, f"atol {atol} rtol {rtol}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python export/check.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("engines", type=Path, help="engine folder")
    parser.add_argument("--graphs", nargs="+", help="only these graphs")
    parser.add_argument("--atol", type=float, default=1e-2)
    parser.add_argument("--rtol", type=float, default=1e-2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("polygraphy").setLevel(logging.ERROR)
    try:
        rows = check_folder(args.engines, args.graphs, atol=args.atol, rtol=args.rtol)
    except (EngineFolderError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for graph, case, ok, detail in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {graph:<12} {case:<16} {detail}")
    failed = sum(not ok for *_, ok, _ in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
