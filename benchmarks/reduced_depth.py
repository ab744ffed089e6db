"""Does a published-form 4b/8b checkpoint build at real widths, match PyTorch, and fit the machine?

    python benchmarks/reduced_depth.py --variant 4b --layers 1          # all runtime graphs
    python benchmarks/reduced_depth.py --variant tiny --graphs dit_step  # seconds (what CI runs)

BLIP3-o's weights cannot reach our machines, so this writes a seeded checkpoint exactly as the
release does (`training.published`) at the variant's real widths with `--layers` blocks per stack
(`training.config.reduced_depth`), builds it through `build_engines` (`--layers`), and records
per stage: wall time, measured peak RSS (`export.resources.peak_rss`) next to the dry run's
estimate, and the bytes added to the folder; per graph: the max abs error of the fp32 ONNX in
ONNX Runtime against the PyTorch wrapper on one spec-drawn input, and the output's scale. A table
on stdout, then JSON to `--json` (default `benchmarks/out/reduced-depth-<variant>-L<layers>.json`;
the committed `benchmarks/results/reduced-depth-4b-L1.json` only when `--json` names it). Memory
scales with the widths, time with the CPU: 4b at 1 layer peaks near 5 GB.
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from export import resources  # noqa: E402
from export.build_plan import BuildRequest, build  # noqa: E402
from export.components import COMPONENTS, GRAPH_COMPONENT  # noqa: E402
from export.dims import graph_dims  # noqa: E402
from export.onnx_export import call_graph, ort_session, run_ort, torch_feeds  # noqa: E402
from export.source import Parts  # noqa: E402
from export.wrappers import graph_module  # noqa: E402
from runtime.folder.graphs import RUNTIME_GRAPHS, graph_specs  # noqa: E402
from runtime.folder.manifest import load_manifest  # noqa: E402
from runtime.folder.spec import profile_sizes, sample_inputs  # noqa: E402
from training.checkpoint import DECODER_DIR, load_model  # noqa: E402
from training.config import reduced_depth  # noqa: E402
from training.decoder_folder import load_decoder  # noqa: E402
from training.model.blip3o import BLIP3o  # noqa: E402
from training.model.decoder import Decoder  # noqa: E402
from training.published import qwen_shaped_tokenizer, write_published  # noqa: E402
from training.tokenizer import build_tiny_tokenizer  # noqa: E402

log = logging.getLogger("reduced_depth")


class _Stages(logging.Handler):
    """Collects the build's per-stage measurements (the records `peak_rss` logs)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stages: dict[str, dict] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "peak_bytes"):
            self.stages[record.stage] = {"seconds": record.seconds, "peak_bytes": record.peak_bytes,
                                         "scope": record.scope}  # fmt: skip


def write_checkpoint(cfg, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model, decoder = BLIP3o(cfg).eval(), Decoder(cfg.decoder).eval()
    for layer in model.dit.layers:  # zero-initialized gates would hide the cross-attention
        torch.nn.init.normal_(layer.gate, std=0.5)
    tokenizer = build_tiny_tokenizer()
    if cfg.variant != "tiny":  # the graphs never see token ids; the config's ids must exist
        tokenizer = qwen_shaped_tokenizer(tokenizer)
    return write_published(model, decoder, tokenizer, folder)


def parity(cfg, ckpt: Path, folder: Path, graph: str) -> dict:
    """fp32 ONNX in ORT vs the PyTorch wrapper, on spec-drawn feeds at the profile's opt sizes."""
    spec = graph_specs(graph_dims(cfg))[graph]
    feeds = sample_inputs(spec, profile_sizes(spec, "opt"), seed=1)
    got = run_ort(ort_session(folder / f"{graph}.fp32.onnx"), feeds)
    prefixes, decoder_parts, _ = COMPONENTS[GRAPH_COMPONENT[graph]]
    model = load_model(ckpt, config=cfg, parts=prefixes) if prefixes else None
    decoder = None
    if decoder_parts:
        decoder = load_decoder(cfg.decoder, ckpt / DECODER_DIR, parts=decoder_parts)
    with torch.no_grad():
        module = graph_module(graph, Parts(cfg, model, decoder, None))
        ref = call_graph(module, spec, torch_feeds(spec, feeds))
    out = {}
    for name, want in zip(spec.output_names, ref):
        want = want.numpy()
        out[name] = {"max_abs_error": float(np.abs(got[name] - want).max()),
                     "scale": float(np.abs(want).max())}  # fmt: skip
    return out


def run(variant: str, layers: int, graphs: tuple[str, ...], work: Path) -> dict:
    cfg = reduced_depth(variant, layers)
    ckpt = work / "ckpt"
    started = time.perf_counter()
    if not (ckpt / "config.json").is_file():
        write_checkpoint(cfg, ckpt)
    written = time.perf_counter() - started
    gc.collect()
    handler = _Stages()
    logging.getLogger("export.resources").addHandler(handler)
    logging.getLogger("export.resources").setLevel(logging.INFO)
    request = BuildRequest(variant=variant, checkpoint=ckpt, layers=cfg.backbone.num_layers,
                           graphs=graphs, out=work / "engines", progress=False)  # fmt: skip
    folder = build(request)
    manifest = load_manifest(folder)
    params = resources.count_params(cfg)
    estimates = resources.stage_costs(list(handler.stages), params, precision="fp32",
                                      graph_components=GRAPH_COMPONENT)  # fmt: skip
    stages = {}
    for cost in estimates:
        record = manifest["stages"][cost.stage]
        size = sum((folder / f["file"]).stat().st_size for f in record["files"])
        stages[cost.stage] = {
            **handler.stages[cost.stage],
            "estimated_peak_bytes": cost.peak_bytes,
            "disk_bytes": size,
            "estimated_disk_bytes": cost.disk_bytes,
        }
    checks = {}
    for graph in graphs:
        checks[graph] = parity(cfg, ckpt, folder, graph)
        gc.collect()
    return {
        "variant": variant,
        "layers": cfg.backbone.num_layers,
        "parameters": {"components": params.components, "graphs": params.graphs},
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()),
        "write_seconds": written,
        "stages": stages,
        "parity": checks,
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }  # fmt: skip


def print_table(result: dict) -> None:
    gb = resources.GB
    print(
        f"{result['variant']} at {result['layers']} layer(s), checkpoint "
        f"{result['checkpoint_bytes'] / gb:.2f} GB (written in {result['write_seconds']:.0f} s)"
    )
    print(
        f"  {'stage':<20} {'time':>7} {'peak RSS':>9} {'estimate':>9} {'disk':>8} {'estimate':>9}"
    )
    for name, s in result["stages"].items():
        print(
            f"  {name:<20} {s['seconds']:>6.0f}s {s['peak_bytes'] / gb:>8.2f}G "
            f"{s['estimated_peak_bytes'] / gb:>8.2f}G {s['disk_bytes'] / gb:>7.2f}G "
            f"{s['estimated_disk_bytes'] / gb:>8.2f}G"
        )
    for graph, outputs in result["parity"].items():
        errors = ", ".join(
            f"{n} {o['max_abs_error']:.1e} (scale {o['scale']:.1f})" for n, o in outputs.items()
        )
        print(f"  {graph}: ORT vs PyTorch max abs error {errors}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="4b", choices=("tiny", "4b", "8b"))
    parser.add_argument("--layers", type=int, default=1, help="blocks per stack")
    parser.add_argument("--graphs", nargs="+", default=list(RUNTIME_GRAPHS), metavar="GRAPH")
    parser.add_argument("--work", type=Path, help="checkpoint + engine folder (default runs/...)")
    parser.add_argument("--json", type=Path, help="result (default benchmarks/out/...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tag = f"{args.variant}-L{args.layers}"
    work = args.work or REPO / "runs" / f"reduced-depth-{tag}"
    result = run(args.variant, args.layers, tuple(args.graphs), work)
    print_table(result)
    path = common.write_json(args.json or common.scratch(f"reduced-depth-{tag}.json"), result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
