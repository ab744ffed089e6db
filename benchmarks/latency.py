"""Latency on one machine, side by side: the PyTorch reference pipeline and the runtime over each
engine folder (ONNX Runtime fp32, INT8/FP8 Q/DQ), end to end and per graph.

    python benchmarks/latency.py --engines engines/tiny-fp32 engines/tiny-int8 --reference
    python benchmarks/latency.py --engines engines/tiny-fp32 --reference --quick   # smoke

Every configuration runs at the same settings: `--threads` (default 1) intra-op threads for torch
and ONNX Runtime alike, the same steps, samplers and guidance (the first folder's manifest
defaults, given explicitly to both sides), the same answer cap. The threads each side actually
used and its graph calls per run are recorded, and the table warns loudly when they differ (an
answer that stopped early, say): a ratio between unlike runs is not a comparison.

Each configuration runs in its own subprocess, so peak RSS is per configuration and the runtime's
process never imports torch. Per configuration: load time (open the folder or build the model,
open every session) and the first `generate` / `answer` (the reference's first `generate` also
samples the decoder's negative when its setting is blank_prompt; engine folders hold it); then
`--warmup` and `--runs` of `generate` and `answer` (min / p50 / p90). Every session call (runtime)
or model forward (reference, by forward hooks) is timed on the real feeds, which gives the per-graph
per-call latency, the time per stage, and the loop's host overhead: end-to-end time minus the
time inside the calls. The reference uses the engine folder's own weights (its checkpoint, or the
seeded random weights of a random-weight folder). Prints the table, then writes `latency.json`
(machine, versions, settings, every number, ratios, targets) and `latency.png` (time per stage
per configuration; needs matplotlib, skipped with a note without it) under `--out` (default
`benchmarks/out/latency-<variant>/`; the committed `benchmarks/results/latency-tiny/` is
rewritten only when `--out` names it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.latency_report import plot, print_table, summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GEN_STAGES = ("prefill", "dit_step", "unet_step", "vae_decoder")
ANSWER_STAGES = ("vision", "prefill", "decode")
QUESTION = "Describe the image."
SAMPLING = ("seed", "steps", "decoder_steps", "sampler", "decoder_sampler", "guidance",
            "decoder_guidance")  # fmt: skip


# measurement (inside a worker process) ----------------------------------------------------------
class CallLog:
    """(graph, seconds) of every session call / model forward since the last `reset`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def reset(self) -> None:
        self.calls = []

    def by_graph(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for name, seconds in self.calls:
            out.setdefault(name, []).append(seconds)
        return out


def peak_rss_bytes() -> int:
    """Peak resident set of this process (VmHWM), without psutil."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def test_image(size: int) -> np.ndarray:
    """A fixed (size, size, 3) uint8 picture: a gradient and a red square."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    image[size // 4 : size // 2, size // 4 : size // 2] = (220, 40, 40)
    return image


def run_series(task, log: CallLog, *, warmup: int, runs: int) -> list[dict]:
    """Warm up, then time `runs` calls of task(); each record has the wall time and its calls."""
    for _ in range(warmup):
        task()
    records = []
    for _ in range(runs):
        log.reset()
        start = time.perf_counter()
        task()
        records.append({"seconds": time.perf_counter() - start, "calls": log.by_graph()})
    return records


def open_runtime(cfg: dict, log: CallLog):
    from runtime.generator import Generator

    class Timed:
        def __init__(self, name: str, session) -> None:
            self.name, self.session, self.spec = name, session, session.spec

        def run(self, feeds):
            start = time.perf_counter()
            out = self.session.run(feeds)
            log.calls.append((self.name, time.perf_counter() - start))
            return out

        def to_host(self, value):
            return self.session.to_host(value)

        def close(self) -> None:
            self.session.close()

    class TimedGenerator(Generator):
        def session(self, name: str):
            return Timed(name, super().session(name))

    options = {"threads": cfg["threads"]}
    gen = TimedGenerator.from_dir(cfg["folder"], device=cfg["device"], session_options=options)
    for name in GEN_STAGES + ANSWER_STAGES:
        if name in gen.manifest["graphs"]:
            gen.session(name)
    generate = lambda **kw: gen.generate(cfg["settings"]["prompt"], **kw)[0]  # noqa: E731
    return gen, generate, cfg["threads"]  # every session's intra_op_num_threads


def open_reference(cfg: dict, log: CallLog):
    import torch

    from runtime.folder.manifest import load_manifest
    from training.config import from_dict
    from training.random_weights import random_pipeline

    torch.set_num_threads(cfg["threads"])
    torch.set_grad_enabled(False)
    manifest = load_manifest(cfg["folder"])
    ckpt = manifest["checkpoint"]["path"]
    if ckpt:
        from training.checkpoint import load_pipeline

        pipe = load_pipeline(ckpt)
    else:  # a random-weight folder records its seed as "random-weights-seed-<seed>"
        seed = int(manifest["checkpoint"]["hash"].rsplit("-", 1)[-1])
        pipe = random_pipeline(from_dict(manifest["config"]), seed)
    if cfg["device"] != "cpu":
        pipe.model.to(cfg["device"])
        pipe.decoder.to(cfg["device"])
    sync = torch.cuda.synchronize if cfg["device"] != "cpu" else (lambda: None)
    qwen = pipe.model.qwen.model

    def timed(module, name_of):
        starts = []

        def pre(_module, args, kwargs):
            sync()
            starts.append((name_of(args, kwargs), time.perf_counter()))

        def post(_module, args, kwargs, output):
            sync()
            name, start = starts.pop()
            log.calls.append((name, time.perf_counter() - start))

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)

    def lm_stage(args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids", args[0] if args else None)
        return "prefill" if x.shape[1] > 1 else "decode"

    timed(qwen.language_model, lm_stage)
    timed(qwen.visual, lambda *_: "vision")
    timed(pipe.model.dit, lambda *_: "dit_step")  # DiT on the CFG batch (guidance on host)
    timed(pipe.decoder.unet, lambda *_: "unet_step")
    decode_latents = pipe.decoder.decode_latents

    def vae(latents):
        sync()
        start = time.perf_counter()
        out = decode_latents(latents)
        sync()
        log.calls.append(("vae_decoder", time.perf_counter() - start))
        return out

    pipe.decoder.decode_latents = vae
    generate = lambda **kw: pipe.generate(cfg["settings"]["prompt"], **kw)  # noqa: E731
    return pipe, generate, torch.get_num_threads()


def worker(cfg: dict) -> dict:
    """Measure one configuration; returns its JSON-ready record."""
    log = CallLog()
    start = time.perf_counter()
    opener = open_reference if cfg["kind"] == "reference" else open_runtime
    model, generate, threads_used = opener(cfg, log)
    load_s = time.perf_counter() - start
    s = cfg["settings"]
    kw = {k: s[k] for k in SAMPLING}  # the same sampling settings on both sides, explicitly
    image = test_image(s["image_size"])

    def answer():
        return model.answer(image, QUESTION, max_new_tokens=s["max_new_tokens"])

    start = time.perf_counter()
    generate(**kw)
    first_generate_s = time.perf_counter() - start
    start = time.perf_counter()
    answer()
    first_answer_s = time.perf_counter() - start
    reps = {"warmup": s["warmup"], "runs": s["runs"]}
    gen_runs = run_series(lambda: generate(**kw), log, **reps)
    ans_runs = run_series(answer, log, **reps)
    device_memory = None
    if cfg["kind"] == "reference" and cfg["device"] != "cpu":
        import torch

        device_memory = torch.cuda.max_memory_allocated()
    return {
        "threads_used": threads_used,
        "load_s": load_s,
        "first_generate_s": first_generate_s,
        "first_answer_s": first_answer_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "device_memory_peak_bytes": device_memory,
        "generate_runs": gen_runs,
        "answer_runs": ans_runs,
        "versions": versions(),
        "torch_imported": "torch" in sys.modules,  # False for the runtime: RSS without torch
    }


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "torch", "transformers", "diffusers"):
        if name in sys.modules or name in ("numpy", "onnxruntime"):
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    return out


# orchestration (parent process) -----------------------------------------------------------------
def machine() -> dict:
    info = {"platform": platform.platform(), "cores": os.cpu_count(), "machine": platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_bytes"] = int(mem[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return info


def configurations(folders: list[Path], reference: bool, device: str, threads: int) -> list[dict]:
    from runtime.folder.manifest import EngineFolderError, load_manifest

    configs, manifests = [], []
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(
                f"error: engine folder {folder} does not exist; build it with: python "
                f"export/build_engines.py --variant tiny --precision <fp32|int8|fp8> --out {folder}"
            )
        try:
            manifests.append(load_manifest(folder))
        except EngineFolderError as err:
            raise SystemExit(f"error: {err}") from err
    if reference:
        m = manifests[0]
        configs.append({"name": "reference", "kind": "reference", "backend": "torch",
                        "precision": "fp32", "variant": m["variant"],
                        "folder": str(folders[0])})  # fmt: skip
    for folder, m in zip(folders, manifests):
        name = f"ort-{m['precision']}"
        if any(c["name"] == name for c in configs):
            name = f"{name} ({folder.name})"
        configs.append({"name": name, "kind": "runtime", "backend": "onnxruntime",
                        "precision": m["precision"], "variant": m["variant"],
                        "folder": str(folder)})  # fmt: skip
    for c in configs:
        c.update(device=device, threads=threads)
    return configs


def run_config(cfg: dict) -> dict:
    """Run one configuration in a fresh Python process; return its record (or its error)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg),
               "--worker-out", str(result)]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0 or not result.is_file():
            return {"error": proc.stderr[-3000:] or f"worker exited with {proc.returncode}"}
        return json.loads(result.read_text())


def benchmark(args: argparse.Namespace) -> dict:
    folders = [Path(f) for f in args.engines]
    configs = configurations(folders, args.reference, args.device, args.threads)
    from runtime.folder.manifest import load_manifest

    m = load_manifest(folders[0])
    sampler = m["sampler"]  # the unset sampling settings: the first folder's, for every side
    settings = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps,
                "decoder_steps": args.decoder_steps, "sampler": sampler["sampler"],
                "decoder_sampler": sampler["decoder_sampler"], "guidance": sampler["guidance"],
                "decoder_guidance": sampler["decoder_guidance"],
                "max_new_tokens": args.max_new_tokens, "runs": args.runs, "warmup": args.warmup,
                "quick": args.quick, "image_size": sampler["image_size"],
                "threads": args.threads, "device": args.device,
                "question": QUESTION}  # fmt: skip
    results = []
    for cfg in configs:
        print(f"measuring {cfg['name']} ({cfg['folder']}) ...", flush=True)
        record = run_config({**cfg, "settings": settings})
        if "error" in record:
            print(f"  {cfg['name']} failed:\n{record['error']}", file=sys.stderr)
        results.append({**cfg, **record})
    return {"machine": machine(), "variant": m["variant"], "resolution": settings["image_size"],
            "settings": settings, "configs": results}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", action="extend", nargs="+", metavar="DIR", help="engine folders")
    p.add_argument("--reference", action="store_true", help="also time the PyTorch reference")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="DiT steps")
    p.add_argument("--decoder-steps", type=int, default=50, help="UNet steps")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length cap")
    p.add_argument("--prompt", default="a red circle above a blue square")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=common.threads_count, default=common.DEFAULT_THREADS,
                   help="intra-op threads of torch and ONNX Runtime alike (default 1)")  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smoke: 1 run, no warm-up, 2+2 steps")
    p.add_argument("--out", type=Path, help="folder (default benchmarks/out/latency-<variant>)")
    p.add_argument("--no-chart", action="store_true", help="table and JSON only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        record = worker(json.loads(args.worker))
        args.worker_out.write_text(json.dumps(record))
        return 0
    if not args.engines:
        p.error("give at least one engine folder: --engines engines/tiny-fp32")
    if args.quick:
        args.runs, args.warmup, args.steps, args.decoder_steps = 1, 0, 2, 2
        args.max_new_tokens = min(args.max_new_tokens, 4)
    result = summarize(benchmark(args))
    out = args.out or common.scratch(f"latency-{result['variant']}")
    report(result, out, chart=not args.no_chart)
    return 1 if any("error" in c for c in result["configs"]) else 0


def report(result: dict, out: Path, *, chart: bool = True) -> None:
    """The table first, then `out/latency.json`, then the chart (when asked and possible)."""
    print_table(result)
    common.write_json(out / "latency.json", result)
    print(f"wrote {out / 'latency.json'}")
    if chart:
        common.save_chart(lambda path: plot(result, path), out / "latency.png")


if __name__ == "__main__":
    sys.exit(main())
