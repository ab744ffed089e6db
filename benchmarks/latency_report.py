"""Numbers, table and chart of `latency.py`: statistics per configuration, ratios, targets.

Everything here is plain arithmetic on the workers' raw records (wall time per run and the
duration of every graph call in it), so the JSON keeps the raw runs next to the summaries.
Targets (CPU, tiny): the runtime over ONNX Runtime at least 2x faster end to end than the
PyTorch reference at the same steps and threads; host overhead (time outside graph calls) at most
5%. `comparison` checks that the configurations ran alike (threads used, the step graphs' and the
decoder's calls per run); when they did not, the table says so loudly above and below the ratios.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STAGES = {
    "generate": ("prefill", "dit_step", "unet_step", "vae_decoder"),
    "answer": ("vision", "prefill", "decode"),
}
SPEEDUP_TARGET, HOST_TARGET = 2.0, 0.05
WORK = (("generate", "dit_step"), ("generate", "unet_step"), ("answer", "decode"))
COLORS = {
    "prefill": 0,
    "dit_step": 1,
    "unet_step": 2,
    "vae_decoder": 3,
    "vision": 4,
    "decode": 6,
    "host": 7,
}  # fmt: skip  (tab10 indices; host in grey)


def stats(values: list[float]) -> dict:
    """min / p50 / p90 (linear interpolation) of a list of seconds."""
    v = np.asarray(values, dtype=float)
    return {"min": float(v.min()), "p50": float(np.median(v)), "p90": float(np.percentile(v, 90)),
            "n": int(v.size)}  # fmt: skip


def series_summary(runs: list[dict], stages: tuple[str, ...]) -> dict:
    wall = [r["seconds"] for r in runs]
    inside = [sum(sum(c) for c in r["calls"].values()) for r in runs]
    share = [(w - i) / w for w, i in zip(wall, inside)]
    per_stage = {s: float(np.median([sum(r["calls"].get(s, [])) for r in runs])) for s in stages}
    per_stage["host"] = float(np.median([w - i for w, i in zip(wall, inside)]))
    graphs = {}
    for name in sorted({n for r in runs for n in r["calls"]}):
        calls = [t for r in runs for t in r["calls"].get(name, [])]
        graphs[name] = {k: v * 1e3 if k != "n" else v for k, v in stats(calls).items()}
        graphs[name]["calls_per_run"] = len(calls) / len(runs)
    return {"seconds": stats(wall), "stages_s": per_stage, "per_call_ms": graphs,
            "host_overhead_share": float(np.median(share))}  # fmt: skip


def summarize(result: dict) -> dict:
    """Add summaries per configuration, ratios and targets to a `latency.py` result."""
    ok = [c for c in result["configs"] if "error" not in c]
    for c in ok:
        for series, stages in STAGES.items():
            c[series] = series_summary(c[f"{series}_runs"], stages)
    ref = next((c for c in ok if c["kind"] == "reference"), None)
    runtime = [c for c in ok if c["kind"] == "runtime"]
    fp32 = next((c for c in runtime if c["precision"] == "fp32"), None)
    ratios: dict = {"runtime_vs_reference": {}, "quantized_vs_fp32": {}}
    targets: dict = {"runtime_vs_reference_ge_2x": {}, "host_overhead_le_5pct": {}}
    for c in runtime:
        if ref is not None:
            r = {s: ref[s]["seconds"]["p50"] / c[s]["seconds"]["p50"] for s in STAGES}
            ratios["runtime_vs_reference"][c["name"]] = r
            targets["runtime_vs_reference_ge_2x"][c["name"]] = {
                "value": r["generate"], "met": r["generate"] >= SPEEDUP_TARGET}  # fmt: skip
        share = c["generate"]["host_overhead_share"]
        targets["host_overhead_le_5pct"][c["name"]] = {"value": share, "met": share <= HOST_TARGET}
        if fp32 is not None and c is not fp32:
            r = {s: fp32[s]["seconds"]["p50"] / c[s]["seconds"]["p50"] for s in STAGES}
            for g in ("dit_step", "unet_step", "vae_decoder"):
                a, b = (x["generate"]["per_call_ms"].get(g) for x in (fp32, c))
                if a and b:
                    r[g] = a["p50"] / b["p50"]
            ratios["quantized_vs_fp32"][c["name"]] = r
    result.update(ratios=ratios, targets=targets, comparison=comparison(ok))
    return result


def comparison(configs: list[dict]) -> dict:
    """Whether the measured configurations ran alike: the threads each used and the calls per run
    of the graphs whose count is the work (steps, answer tokens); `problems` names what differs."""
    threads = {c["name"]: c.get("threads_used") for c in configs}
    calls = {
        c["name"]: {g: c[s]["per_call_ms"].get(g, {}).get("calls_per_run") for s, g in WORK}
        for c in configs
    }
    problems = []
    if len(set(threads.values())) > 1:
        problems.append(f"threads used differ: {threads}")
    for _, graph in WORK:
        counts = {name: per[graph] for name, per in calls.items()}
        if len(set(counts.values())) > 1:
            problems.append(f"{graph} calls per run differ: {counts}")
    return {"threads_used": threads, "calls_per_run": calls, "equal": not problems,
            "problems": problems}  # fmt: skip


def _warn_unlike(result: dict) -> None:
    cmp = result.get("comparison", {"equal": True})
    if not cmp["equal"]:
        print("WARNING: the configurations did not run alike; the ratios below compare unlike "
              "runs: " + "; ".join(cmp["problems"]))  # fmt: skip


def _fmt(s: dict) -> str:
    return f"{s['p50']:7.3f} [{s['min']:.3f}, {s['p90']:.3f}]"


def print_table(result: dict) -> None:
    st, m = result["settings"], result["machine"]
    print(
        f"\nlatency: {result['variant']}, {st['steps']} DiT + {st['decoder_steps']} UNet steps, "
        f"{st['image_size']}x{st['image_size']}, answer <= {st['max_new_tokens']} tokens; "
        f"{st['runs']} runs after {st['warmup']} warm-up; {m.get('cpu', m['machine'])} "
        f"({m['cores']} cores), device {st['device']}"
    )
    print(
        f"every configuration: threads {st['threads']}, sampler {st.get('sampler')} "
        f"(guidance {st.get('guidance')}) + decoder {st.get('decoder_sampler')} (guidance "
        f"{st.get('decoder_guidance')}), seed {st['seed']}"
    )
    _warn_unlike(result)
    print(f"{'config':<14}{'load s':>8}{'1st gen s':>10}  {'generate s p50 [min, p90]':<28}"
          f"{'answer s p50 [min, p90]':<27}{'host gen':>9}{'host ans':>9}"
          f"{'RSS MiB':>9}")  # fmt: skip
    for c in result["configs"]:
        if "error" in c:
            print(f"{c['name']:<14}FAILED: {c['error'].strip().splitlines()[-1][:80]}")
            continue
        g, a = c["generate"], c["answer"]
        print(
            f"{c['name']:<14}{c['load_s']:>8.2f}{c['first_generate_s']:>10.2f}  "
            f"{_fmt(g['seconds']):<28}{_fmt(a['seconds']):<27}"
            f"{g['host_overhead_share']:>8.1%}{a['host_overhead_share']:>9.1%}"
            f"{c['peak_rss_bytes'] / 2**20:>9.0f}"
        )
    cols = [("generate", s) for s in STAGES["generate"]] + [("answer", s) for s in STAGES["answer"]]
    print("per call, p50 ms (calls per run):")
    print(f"{'config':<14}" + "".join(f"{s[:11]:>17}" for _, s in cols))
    for c in result["configs"]:
        if "error" not in c:
            cells = []
            for series, s in cols:
                g = c[series]["per_call_ms"].get(s)
                cells.append(
                    f"{g['p50']:>10.2f} ({g['calls_per_run']:>3.0f})" if g else f"{'-':>16}"
                )
            print(f"{c['name']:<14}" + " ".join(cells))
    _warn_unlike(result)
    for kind, table in result["ratios"].items():
        for name, r in table.items():
            print(f"{kind} [{name}]: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    for kind, table in result["targets"].items():
        for name, t in table.items():
            v = f"{t['value']:.1%}" if "host" in kind else f"{t['value']:.2f}x"
            print(f"target {kind} [{name}]: {v} -> {'met' if t['met'] else 'MISSED'}")


def plot(result: dict, path: Path) -> None:
    """Horizontal stacked bars: p50 time per stage, per configuration, generate and answer.
    Called through `common.save_chart` (matplotlib present, Agg backend)."""
    import matplotlib.pyplot as plt

    configs = [c for c in result["configs"] if "error" not in c]
    fig, axes = plt.subplots(1, 2, figsize=(13, 2.0 + 0.6 * max(len(configs), 1)))
    colors = plt.get_cmap("tab10")
    for ax, (series, stages) in zip(axes, STAGES.items()):
        left = np.zeros(len(configs))
        for stage in (*stages, "host"):
            widths = np.array([c[series]["stages_s"][stage] for c in configs])
            color = colors(COLORS[stage])
            ax.barh([c["name"] for c in configs], widths, left=left, color=color, label=stage)
            left += widths
        ax.set_title(f"{series} (p50 run)")
        ax.set_xlabel("seconds")
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5)
    st = result["settings"]
    fig.suptitle(
        f"{result['variant']}: {st['steps']} DiT + {st['decoder_steps']} UNet steps, "
        f"{st['image_size']} px; {result['machine'].get('cpu', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
