"""GPU check at BLIP3-o 4b shapes with random weights: eager vs optimized PyTorch, per graph and
per image, on a lent H100/H200 (PyTorch + CUDA only: no diffusers, no TensorRT, no ORT-GPU).

    python benchmarks/gpu_check.py              # CUDA; < 8 min; JSON + table under $OUT
    python benchmarks/gpu_check.py --dry-run    # CPU, tiny shapes, seconds (what CI runs)

Latency does not depend on weight values, so random weights at the true shapes measure real
latency. Timed per call (CUDA events, median after warm-up): DiT step at CFG batch 2 (our
NextDiT), UNet step at CFG batch 2 on 128x128x4 latents and the VAE decode at 1024x1024 (the
layout-equivalent stand-ins of `gpu_models.py`: random weights, for latency), prefill of 128
tokens (transformers' Qwen2.5-VL text decoder). Step graphs include CFG and the sampler update,
as the exported `dit_step`/`unet_step` do (the coefficients of the config's samplers from
`runtime.jobs.samplers`, Euler by default). Variants: eager fp16 and bf16; bf16 captured in a CUDA
graph; FP8 linears via `torch._scaled_mm` + CUDA graph (optional, Hopper/Ada only; convs stay
bf16); `torch.compile` + CUDA graph (last, skipped when the budget runs short). FLOP/s use the
counts of `roofline.py` against the card's dense peak and a measured 8192^3 bf16 matmul. Per
image: the sum of per-step times and one real timed loop (prefill, 30 DiT steps, 50 UNet steps,
VAE) for eager bf16 and for the fastest path per graph. Every variant of a graph runs at the same
shapes, and both per-image loops at the same steps. Results (`gpu_check.json`, under `$OUT`, the
lent machine's return folder, else `benchmarks/out/gpu_check/`) are saved after every
measurement, so a run cut short still leaves its JSON; the table is printed last. No chart.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import common, roofline  # noqa: E402
from benchmarks.gpu_models import PROMPT_TOKENS, build, cast, fp8_linears  # noqa: E402
from runtime.jobs.samplers import decoder_plan, flow_plan  # noqa: E402
from training.config import from_preset  # noqa: E402

GRAPHS = ("prefill", "dit_step", "unet_step", "vae_decoder")
FP8_GRAPHS = ("prefill", "dit_step", "unet_step")  # the VAE is conv-bound: no FP8 path here
FORBIDDEN = ("diffusers", "onnxruntime", "tensorrt")
COMPILE_COST_S = {"dit_step": 90, "unet_step": 150}  # rough compile time on an H100


class OutOfBudget(Exception):
    pass


class Check:
    """Holds the run's state and its JSON; `save()` after every measurement."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.monotonic()
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        # bf16 on the GPU; the CPU dry run computes in fp32 (CPU bf16 convolutions crawl)
        self.dtype = torch.bfloat16 if self.cuda or args.dtype == "bf16" else torch.float32
        self.eager = "eager-bf16" if self.dtype == torch.bfloat16 else "eager-fp32"
        self.out = Path(os.environ.get("OUT") or common.scratch("gpu_check"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"script": "benchmarks/gpu_check.py", "dry_run": args.dry_run}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")

    def measure(self, fn, *, warmup: int = 3, min_reps: int = 5, max_reps: int = 50,
                target_s: float = 0.5) -> dict:  # fmt: skip
        if self.args.dry_run:  # exercise the code, not the clock
            warmup, min_reps, max_reps = 1, 1, 1
        for _ in range(warmup):
            fn()
        self.sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_reps and (
            len(times) < min_reps or time.perf_counter() - start < target_s
        ):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        times.sort()
        return {"median_ms": times[len(times) // 2] * 1e3, "min_ms": times[0] * 1e3,
                "reps": len(times)}  # fmt: skip


def cuda_graph(fn):
    """Capture fn (over static inputs) once; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    replay.graph = graph  # keep the graph (and its pool) alive with the callable
    return replay


def error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def rel_err(out, ref) -> float | str:
    """||out - ref|| / ||ref|| in float64; "nan"/"inf" when an output overflowed."""
    out, ref = out.double(), ref.double()
    value = float((out - ref).norm() / ref.norm().clamp(min=1e-30))
    return value if math.isfinite(value) else str(value)


# phases ----------------------------------------------------------------------------------------
def device_info(check: Check) -> dict:
    info = {"name": torch.cuda.get_device_name() if check.cuda else "cpu (dry run)"}
    if check.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))  # fmt: skip
    return info


def card_peak(name: str) -> dict | None:
    key = "h200" if "H200" in name else "h100-sxm" if "H100" in name else None
    if key is None:
        return None
    dev = roofline.DEVICES[key]
    note = "an H100 PCIe peaks lower (756 dense BF16 TFLOP/s)" if "PCIe" in name else ""
    return {"table": key, "bf16": dev.peak["16-bit"], "fp8": dev.peak["8-bit"],
            "bandwidth": dev.bandwidth, "source": dev.source, "note": note}  # fmt: skip


def ceilings(check: Check) -> dict:
    """Measured ceilings: a square bf16 matmul and a device-to-device copy (read + write)."""
    n = 8192 if check.cuda else 256
    dtype = torch.bfloat16 if check.cuda else torch.float32
    a, b = (torch.randn(n, n, device=check.dev, dtype=dtype) for _ in range(2))
    mm = check.measure(lambda: a @ b, max_reps=10, target_s=0.2)
    x = torch.randn((1 << 28) if check.cuda else (1 << 20), device=check.dev)
    y = torch.empty_like(x)
    cp = check.measure(lambda: y.copy_(x), max_reps=10, target_s=0.2)
    return {"matmul_tflops": 2 * n**3 / (mm["median_ms"] / 1e3) / 1e12, "matmul_n": n,
            "copy_tb_s": 2 * x.numel() * 4 / (cp["median_ms"] / 1e3) / 1e12}  # fmt: skip


def try_variant(check: Check, name: str, variant: str, make, ref, fns: dict) -> None:
    """Build a variant's callable with `make()`, compare it with `ref`, time it, keep it."""
    comp = check.data["components"][name]
    try:
        fn = make()
        err = rel_err(fn(), ref)
        comp["variants"][variant] = dict(check.measure(fn), rel_err_vs_eager=err)
        fns[name][variant] = fn
    except OutOfBudget:
        raise
    except Exception as exc:  # an optional path that fails here is a finding, not a crash
        comp["variants"][variant] = {"error": error(exc)}
    check.save()


def per_graph(check: Check, comps: dict, fns: dict) -> None:
    """Eager fp16/bf16, CUDA graph, FP8 linears (+ graph) for each graph."""
    fp8_ok = (not check.cuda) or torch.cuda.get_device_capability() >= (8, 9)
    wrap = cuda_graph if check.cuda else (lambda fn: fn)
    for name, (model, inputs, step, cost, calls) in comps.items():
        comp = {"gflop": cost.flops / 1e9, "params": cost.params, "calls_per_image": calls,
                "variants": {}}  # fmt: skip
        check.data["components"][name] = comp
        if check.cuda:
            torch.cuda.reset_peak_memory_stats()

        def eager(m=model, i=inputs, s=step):
            return s(m, **i)

        fns[name] = {check.eager: eager}
        ref = eager()
        comp["variants"][check.eager] = check.measure(eager)
        check.save()
        if check.cuda:
            m16, half = copy.deepcopy(model).half(), cast(inputs, torch.float16)
            fp16 = lambda m=m16, h=half, s=step: lambda: s(m, **h)  # noqa: E731
            try_variant(check, name, "eager-fp16", fp16, ref, fns)
            fns[name].pop("eager-fp16", None)  # timed; the image loops run bf16
            del m16, half
            torch.cuda.empty_cache()
            try_variant(check, name, "cudagraph-bf16", lambda e=eager: cuda_graph(e), ref, fns)
        if name in FP8_GRAPHS and fp8_ok:

            def make(m=model, i=inputs, s=step):
                m8 = copy.deepcopy(m)
                fp8_linears(m8)
                fn = wrap(lambda: s(m8, **i))
                fn.model = m8  # the graph reads m8's buffers: keep them alive
                return fn

            label = "fp8-linear+cudagraph" if check.cuda else "fp8-linear"
            try_variant(check, name, label, make, ref, fns)
        if check.cuda:
            comp["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        check.save()


def compiled(check: Check, comps: dict, fns: dict) -> None:
    """torch.compile + CUDA graph of the two step graphs, while the budget allows."""
    if not check.cuda or check.args.no_compile:
        why = "no CUDA (dry run)" if not check.cuda else "--no-compile"
        check.data["skipped"].append(f"torch.compile: {why}")
        return
    mode = check.args.compile_mode
    for name in ("unet_step", "dit_step"):  # the UNet dominates an image: first
        need = COMPILE_COST_S[name]
        if check.left() < need + 30:
            check.data["skipped"].append(
                f"torch.compile {name}: budget ({check.left():.0f} s left, needs ~{need} s)"
            )
            continue
        model, inputs, step, _, _ = comps[name]
        cm = torch.compile(model, mode=mode)
        ref = fns[name][check.eager]()
        try_variant(
            check, name, f"compile-{mode}+cudagraph",
            lambda cm=cm, i=inputs, s=step: cuda_graph(lambda: s(cm, **i)), ref, fns,
        )  # fmt: skip


def best_paths(check: Check, fns: dict) -> dict:
    """The fastest working variant of each graph (a dry run takes the last one, to exercise it)."""
    comps = check.data["components"]
    if check.args.dry_run:
        return {k: list(v)[-1] for k, v in fns.items()}
    return {
        k: min(v, key=lambda x, k=k: comps[k]["variants"][x]["median_ms"]) for k, v in fns.items()
    }


def image_loop(check: Check, cfg, comps: dict, fns: dict, paths: dict, steps: int, dsteps: int):
    """One image: prefill -> DiT steps -> UNet steps -> VAE, feeding each output onward."""
    dev, dtype, dec = check.dev, check.dtype, cfg.decoder
    _, dit, unet, vae = (comps[k][1] for k in GRAPHS)
    run = {k: fns[k][paths[k]] for k in GRAPHS}
    flow = flow_plan(cfg.sampler.sampler, steps)  # the runtime's per-call scalars
    plan = decoder_plan(cfg.sampler.decoder_sampler, dsteps, dataclasses.asdict(dec))

    def column(calls, field, dt=dtype):
        return torch.tensor([getattr(c, field) for c in calls], dtype=dt, device=dev)

    dit_t = column(flow.calls, "timestep", torch.long)
    dit_c = {k: column(flow.calls, k) for k in ("c_velocity", "c_prev")}
    u_t = column(plan.calls, "timestep", torch.float32)
    u_c = {k: column(plan.calls, k) for k in ("in_scale", "c_sample", "c_eps", "c_prev")}
    noise, lat_noise = torch.randn_like(dit["x"]), torch.randn_like(unet["latents"])
    n_query = dit["cond"].shape[1]

    def one_image():
        dit["cond"].copy_(run["prefill"]()[:, -n_query:])  # (1, 64, H)
        dit["x"].copy_(noise)
        for i in range(len(flow.calls)):
            dit["t"].copy_(dit_t[i : i + 1])
            for k, col in dit_c.items():
                dit[k].copy_(col[i : i + 1])
            dit["x"].copy_(run["dit_step"]())
        unet["feats"][:1].copy_(dit["x"].flatten(2).transpose(1, 2))  # (1, 64, C)
        unet["text"].copy_(unet["feats"].mean(dim=1))
        unet["latents"].copy_(lat_noise * plan.init_noise_sigma)
        for i in range(len(plan.calls)):
            unet["t"].copy_(u_t[i : i + 1])
            for k, col in u_c.items():
                unet[k].copy_(col[i : i + 1])
            unet["latents"].copy_(run["unet_step"]())
        vae["latents"].copy_(unet["latents"])
        return run["vae_decoder"]()

    timing = check.measure(one_image, warmup=1, min_reps=2, max_reps=3, target_s=0)
    return dict(timing, paths=paths)


def per_image(check: Check, cfg, comps: dict, fns: dict, label: str, paths: dict) -> None:
    a = check.args
    comp = check.data["components"]
    e2e = check.data["per_image"]
    calls = {"prefill": 1, "dit_step": a.steps, "unet_step": a.decoder_steps, "vae_decoder": 1}
    e2e["sum_of_steps_ms"][label] = sum(
        calls[k] * comp[k]["variants"][paths[k]]["median_ms"] for k in GRAPHS
    )
    try:
        e2e["loop"][label] = image_loop(check, cfg, comps, fns, paths, a.steps, a.decoder_steps)
    except OutOfBudget:
        raise
    except Exception as exc:
        e2e["loop"][label] = {"error": error(exc), "paths": paths}
    check.save()


def summarize(check: Check) -> None:
    peak = check.data.get("peak")
    for comp in check.data["components"].values():
        eager = comp["variants"].get(check.eager, {}).get("median_ms")
        for variant, v in comp["variants"].items():
            if "median_ms" not in v:
                continue
            v["tflops"] = comp["gflop"] / v["median_ms"]
            if eager:
                v["speedup_vs_eager"] = eager / v["median_ms"]
            if peak:
                v["pct_of_peak"] = (
                    100 * v["tflops"] * 1e12 / peak["fp8" if "fp8" in variant else "bf16"]
                )
    loops = check.data["per_image"]["loop"]
    best = [v["median_ms"] for k, v in loops.items() if k != check.eager and "median_ms" in v]

    def speedup(name):
        v = check.data["components"].get(name, {}).get("variants", {})
        fast = [x.get("speedup_vs_eager", 0) for k, x in v.items() if "eager" not in k]
        return max(fast, default=None)

    dry = check.args.dry_run
    image = min(best) if best else None

    def target(value, goal, met):
        return {"value": value, "target": goal, "met": None if dry or value is None else met}

    dit, unet = speedup("dit_step"), speedup("unet_step")
    check.data["targets"] = {
        "dit_optimized_vs_eager": target(dit, ">= 2x", dit is not None and dit >= 2),
        "unet_optimized_vs_eager": target(unet, ">= 2x", unet is not None and unet >= 2),
        "image_ms_on_h100": target(image, "<= 1000 ms", image is not None and image <= 1000),
    }
    check.save()


def print_table(check: Check) -> None:
    d = check.data
    print(f"\n{d['device']['name']}  variant {d['variant']}  ceilings {d.get('ceilings')}")
    print(f"{'graph':<12}{'variant':<34}{'median ms':>10}{'TFLOP/s':>9}{'%peak':>7}{'x eager':>8}"
          f"{'rel err':>9}")  # fmt: skip
    for name, comp in d["components"].items():
        for variant, v in comp["variants"].items():
            if "median_ms" not in v:
                print(f"{name:<12}{variant:<34}  {v.get('error', '')[:60]}")
                continue
            err = v.get("rel_err_vs_eager", "")
            err = f"{err:.1e}" if isinstance(err, float) else err
            print(
                f"{name:<12}{variant:<34}{v['median_ms']:>10.3f}{v.get('tflops', 0):>9.1f}"
                f"{v.get('pct_of_peak', 0):>7.1f}{v.get('speedup_vs_eager', 0):>8.2f}"
                f"{err:>9}"
            )
    for label, ms in d["per_image"]["sum_of_steps_ms"].items():
        loop = d["per_image"]["loop"].get(label, {})
        timed = loop.get("median_ms", float("nan"))
        print(f"per image [{label}]: sum of steps {ms:.1f} ms, timed loop {timed:.1f} ms")
        print(f"  paths {loop.get('paths')}")
    for line in d["skipped"]:
        print("skipped:", line)
    print(f"targets: {d.get('targets')}  stopped: {d.get('stopped')}  elapsed {d['elapsed_s']} s")


def run(check: Check) -> None:
    a = check.args
    cfg = from_preset("tiny" if a.dry_run else a.variant)
    d = check.data
    d.update(variant=cfg.variant, device=device_info(check), budget_s=a.budget_s, stopped=None,
             steps=a.steps, decoder_steps=a.decoder_steps, prompt_tokens=PROMPT_TOKENS,
             components={}, per_image={"sum_of_steps_ms": {}, "loop": {}}, skipped=[],
             versions={"torch": torch.__version__, "cuda": torch.version.cuda,
                       "python": platform.python_version()},
             weights="random (latency only); UNet and VAE are layout-equivalent stand-ins "
                     "(benchmarks/gpu_models.py), random weights, for latency")  # fmt: skip
    d["peak"] = card_peak(d["device"]["name"]) if check.cuda else None
    d["ceilings"] = ceilings(check)
    check.save()
    with torch.device(check.dev), torch.no_grad():  # factory calls inside forwards stay on device
        comps = build(cfg, check.dev, check.dtype)
        fns: dict = {}
        per_graph(check, comps, fns)
        eager = {k: check.eager for k in GRAPHS}
        per_image(check, cfg, comps, fns, check.eager, eager)
        best = best_paths(check, fns)
        if best != eager:
            per_image(check, cfg, comps, fns, "best", best)
        compiled(check, comps, fns)
        final = best_paths(check, fns)
        if final != best:
            per_image(check, cfg, comps, fns, "best+compile", final)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few seconds")
    p.add_argument("--variant", default="4b", choices=["4b", "8b"])
    p.add_argument("--steps", type=int, help="DiT steps per image (default 30; dry run 2)")
    p.add_argument("--decoder-steps", type=int, help="UNet steps (default 50; dry run 2)")
    p.add_argument("--budget-s", type=float, default=450.0, help="hard stop (self-imposed)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "max-autotune-no-cudagraphs"])  # fmt: skip
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dry run only")
    a = p.parse_args(argv)
    a.steps = a.steps or (2 if a.dry_run else 30)
    a.decoder_steps = a.decoder_steps or (2 if a.dry_run else 50)
    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    if a.dry_run:
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest and immune to a busy CPU
    check = Check(a)

    def stop(*_):
        raise OutOfBudget

    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, a.budget_s)
    try:
        run(check)
    except OutOfBudget:
        check.data["stopped"] = f"budget of {a.budget_s:.0f} s reached; later phases not run"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    # what this check must run without (the lent machines lack them): recorded, and tested
    check.data["forbidden_imports"] = [m for m in FORBIDDEN if m in sys.modules]
    summarize(check)
    print_table(check)
    print(f"results: {check.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
