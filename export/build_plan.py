"""What `build_engines.py` does: validate the request, check the weights, plan and run the stages.

One folder per variant (and depth), precision and backend. Stages, in order: `assets`
(tokenizer, token embeddings, latent queries for the host), `negative` (the decoder's CFG
negative features, per `sampler.decoder_negative`), `export:<graph>` (ONNX at fp32, or
fp16/bf16 for those precisions), `quantize:<graph>` (INT8/FP8 Q/DQ of the generation graphs,
calibrated with the real sampler), `engine:<graph>` (TensorRT, only with `--backend tensorrt`).
The checkpoint is checked before the folder is made (`export.source`); graphs are exported one
at a time, each stage loading only the component it needs, and only when it must run. A dry run
prints each stage's estimated memory and disk and the calibration's cost (`export.resources`).
A build shows one progress bar per stage and sends the exporters' and quantizers' own output
to its log file beside the folder (`export.build_log`); torch and ONNX Runtime run on
`--threads` (one for tiny by default).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import export.resources as resources
import export.trt_build as trt_build
from export.build_folder import (
    REPO,
    BuildFolder,
    InterruptGuard,
    LockedError,
    build_lock,
    host_entries,
    remove_partials,
    tool_versions,
)
from export.build_log import BuildLog, log_path
from export.calibration import load_prompts
from export.components import GRAPH_COMPONENT
from export.dims import graph_dims
from export.errors import BuildError
from export.source import ModelSource, calibration_device
from export.stage_factory import StageFactory
from export.trt_plan import BATCH_DIMS, pin_batch
from runtime.folder.graphs import GRAPHS, RUNTIME_GRAPHS, graph_specs
from runtime.folder.manifest import FORMAT_VERSION, EngineFolderError, load_manifest
from runtime.folder.schema import DECODER_NEGATIVES, SCHEMAS
from runtime.folder.spec import PRECISIONS, io_dtype
from runtime.machine.compat import INSTALL_ORT
from runtime.machine.hardware import PLANNING_SM, auto_precision, resolve_precision
from training.config import (
    CHAT_TEMPLATE,
    GENERATION_INSTRUCTION,
    IMAGE_CHAT_TEXT,
    IMAGE_PAD,
    SYSTEM_PROMPT,
    depth_label,
    from_preset,
    to_dict,
)
from training.data.shapes import vocabulary

log = logging.getLogger(__name__)

VARIANTS = ("tiny", "4b", "8b")
# intra-op threads a build uses by default: tiny's width-128 ops run as fast on one thread, and
# two threads in one process thrash on a shared machine (a tiny INT8 build's calibration took
# 118 s with torch's 2 threads against 49 s with 1 here); None: torch's and ORT's own default
DEFAULT_THREADS = {"tiny": 1, "4b": None, "8b": None}
BACKENDS = ("onnxruntime", "tensorrt")
PRECISION_CHOICES = ("auto", *PRECISIONS)
DEVICES = ("auto", "cpu", "cuda")
DECODER_SCHEDULER = ("check", "checkpoint", "preset")  # training.decoder_folder.SCHEDULER_MODES
PUBLISHED = {
    "4b": "https://huggingface.co/BLIP3o/BLIP3o-Model-4B",
    "8b": "https://huggingface.co/BLIP3o/BLIP3o-Model-8B",
}


@dataclass(frozen=True)
class BuildRequest:
    variant: str
    checkpoint: Path | None = None
    precision: str = "auto"
    backend: str = "onnxruntime"
    out: Path | None = None
    graphs: tuple[str, ...] | None = None
    calibration_prompts: Path | None = None
    force: bool = False
    dry_run: bool = False
    seed: int = 0
    random_weights: bool = False  # seeded random weights, e.g. 4b/8b shapes for latency only
    progress: bool = True
    calibration_steps: tuple[int, int] | None = None  # (DiT, UNet) steps; sampler's by default
    calibration_count: int | None = None  # at most this many calibration prompts
    layers: int | None = None  # reduced depth at real widths (training.config.reduced_depth)
    decoder_scheduler: str = "check"  # the checkpoint's scheduler config vs the preset
    device: str = "auto"  # where calibration and the negative run: cuda when torch sees a GPU
    decoder_negative: str | None = None  # blank_prompt|zeros; None: the checkpoint config's
    # TensorRT: the generation graphs' batch pinned to B (specs, ONNX, engines and manifest), so
    # the runtime captures their engines into CUDA graphs; every call then takes exactly B images
    static_batch: int | None = None
    # recorded calls each quantized graph is calibrated on (spread over every step and prompt);
    # None: export.quantize_stages.DEFAULT_SAMPLES
    calibration_samples: int | None = None
    # intra-op threads of torch and ONNX Runtime during the build; None: the variant's default
    # (DEFAULT_THREADS: 1 for tiny, the libraries' own for 4b/8b)
    threads: int | None = None


def resolve(request: BuildRequest) -> tuple[str, tuple[int, int] | None, str | None]:
    """Validate the request; return (precision, compute capability, TensorRT version)."""
    if request.variant not in VARIANTS:
        raise BuildError(f"unknown variant {request.variant!r}; valid: {', '.join(VARIANTS)}")
    if request.precision not in PRECISION_CHOICES:
        raise BuildError(
            f"unknown precision {request.precision!r}; valid: {', '.join(PRECISION_CHOICES)}"
        )
    if request.backend not in BACKENDS:
        raise BuildError(f"unknown backend {request.backend!r}; valid: {', '.join(BACKENDS)}")
    bad = sorted(set(request.graphs or ()) - set(GRAPHS))
    if bad:
        raise BuildError(f"unknown graph(s) {bad}; valid: {', '.join(GRAPHS)}")
    if request.device not in DEVICES:
        raise BuildError(f"unknown device {request.device!r}; valid: {', '.join(DEVICES)}")
    if request.decoder_negative not in (None, *DECODER_NEGATIVES):
        raise BuildError(
            f"unknown decoder negative {request.decoder_negative!r}; valid: "
            f"{', '.join(DECODER_NEGATIVES)}"
        )
    if request.decoder_scheduler not in DECODER_SCHEDULER:
        raise BuildError(
            f"unknown decoder scheduler mode {request.decoder_scheduler!r}; valid: "
            f"{', '.join(DECODER_SCHEDULER)}"
        )
    for name, value in (
        ("calibration_count", request.calibration_count),
        ("calibration_samples", request.calibration_samples),
        ("threads", request.threads),
        ("layers", request.layers),
        ("static_batch", request.static_batch),
        *zip(("calibration_steps DiT", "calibration_steps UNet"), request.calibration_steps or ()),
    ):
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
        if value is not None and bad:
            raise BuildError(f"{name} must be an integer >= 1, got {value!r}")
    if request.layers is not None:
        full = from_preset(request.variant).backbone.num_layers
        if request.layers > full:
            raise BuildError(f"--layers {request.layers}: {request.variant} has {full} layers")
    if request.static_batch is not None and request.backend != "tensorrt":
        raise BuildError(
            "--static-batch pins TensorRT engines for CUDA-graph capture; it needs --backend "
            f"tensorrt (got --backend {request.backend})"
        )
    if request.random_weights and request.checkpoint is not None:
        raise BuildError("--random-weights and --checkpoint exclude each other")
    if request.variant != "tiny" and request.checkpoint is None and not request.random_weights:
        raise BuildError(
            f"--variant {request.variant} needs --checkpoint DIR: BLIP3-o's weights are not "
            f"bundled. Download the published checkpoint ({PUBLISHED[request.variant]}) and "
            "pass its folder (or --random-weights for latency work at the true shapes)."
        )
    if request.checkpoint is not None and not request.checkpoint.is_dir():
        raise BuildError(f"checkpoint folder {request.checkpoint} does not exist")
    if request.calibration_prompts is not None:
        try:
            load_prompts(request.calibration_prompts)
        except (OSError, ValueError) as err:
            raise BuildError(f"--calibration-prompts: {err}") from err
    sm = trt_build.compute_capability()
    trt = trt_build.tensorrt_version()
    if request.backend == "tensorrt":
        if trt is None and not request.dry_run:
            raise BuildError(
                "--backend tensorrt needs TensorRT: pip install '.[trt]' on the GPU machine "
                "(TensorRT cannot be installed in this project's CI); or use "
                "--backend onnxruntime"
            )
        if sm is None and not request.dry_run:
            raise BuildError("--backend tensorrt needs a CUDA GPU; none was found")
    if not request.dry_run and importlib.util.find_spec("onnxruntime") is None:
        raise BuildError(f"the exporter checks every graph with ONNX Runtime: {INSTALL_ORT}")
    if request.precision == "auto":  # the decision `python -m runtime doctor` reports
        precision, reason = auto_precision(request.backend, sm)
        log.info("--precision auto: %s (%s)", precision, reason)
        return precision, sm, trt
    precision = request.precision
    # TensorRT: the GPU must run it (a dry run without one plans for PLANNING_SM); ONNX Runtime
    # builds anything on CPU, but an fp8 folder on a GPU needs FP8 tensor cores.
    if request.backend == "tensorrt" or (precision == "fp8" and sm is not None):
        try:
            resolve_precision(precision, sm or PLANNING_SM)
        except ValueError as err:
            raise BuildError(str(err)) from err
    return precision, sm, trt


def pinned_specs(specs: dict, static_batch: int) -> dict:
    """Every spec with a `batch` / `cfg_batch` dim pinned to B / 2B (`export.trt_plan.pin_batch`);
    the text graphs (their own batch and sequence dims) stay dynamic. B must fit the profile."""
    try:
        return {
            name: pin_batch(spec, static_batch)
            if any(d.name in BATCH_DIMS for d in spec.dims)
            else spec
            for name, spec in specs.items()
        }
    except ValueError as err:
        raise BuildError(f"--static-batch {static_batch}: {err}") from err


def output_folder(request: BuildRequest, precision: str, label: str | None = None) -> Path:
    """`engines/<variant>[-L<layers>]-<precision>[-<backend>]` unless `--out`; the backend is
    left out for onnxruntime, so folders of different backends never share a name."""
    label = label or request.variant
    backend = "" if request.backend == "onnxruntime" else f"-{request.backend}"
    pinned = f"-b{request.static_batch}" if request.static_batch else ""
    folder = request.out or REPO / "engines" / f"{label}-{precision}{backend}{pinned}"
    if (folder / "manifest.json").exists():
        try:
            old = load_manifest(folder)
        except EngineFolderError:
            old = None
        new = (request.variant, precision, request.backend)
        if old and (old["variant"], old["precision"], old.get("backend")) != new:
            raise BuildError(
                f"{folder} holds a {old['variant']}-{old['precision']} engine folder for "
                f"{old.get('backend')}; choose another --out for "
                f"{request.variant}-{precision} ({request.backend})"
            )
    return folder


def template_info(variant: str) -> dict:
    """The prompt templates the runtime renders; a closed-world model (tiny: the shapes world)
    also records the words it was trained on, so the runtime can name a prompt's other words."""
    info = {
        "chat": CHAT_TEMPLATE,
        "system": SYSTEM_PROMPT,
        "generation_instruction": GENERATION_INSTRUCTION,
        "image_chat": IMAGE_CHAT_TEXT,
        "image_pad": IMAGE_PAD,
        "negative_prompt": "",
    }
    if variant == "tiny":
        info["vocabulary"] = vocabulary()
    return info


def build(request: BuildRequest) -> Path:
    """Run (or, with dry_run, print) the plan; return the engine folder.

    The checkpoint is checked (config, files, keys, decoder, tokenizer) before the folder is
    made: a bad one raises `BuildError` and leaves nothing behind.
    """
    precision, sm, trt = resolve(request)
    source = ModelSource(request, precision)
    cfg = source.config
    folder = output_folder(request, precision, depth_label(cfg))
    specs = graph_specs(graph_dims(cfg))
    if request.static_batch is not None:
        specs = pinned_specs(specs, request.static_batch)
    wanted = request.graphs or RUNTIME_GRAPHS
    names = [g for g in GRAPHS if g in wanted]
    versions = tool_versions()
    factory = StageFactory(request, source, precision, specs, versions, sm, trt, names)
    if request.dry_run:
        manifest = _start_manifest(folder, request, precision, source, sm, trt, versions)
        _print_plan(BuildFolder(folder, manifest), factory, names, folder, source)
        return folder
    created = not folder.exists()
    output = BuildLog(log_path(folder), progress=request.progress)
    try:
        with build_lock(folder), InterruptGuard() as guard, output, build_threads(request):
            folder.mkdir(parents=True, exist_ok=True)
            log.info("build log: %s", output.path)
            # Read under the lock: a build that finished meanwhile is seen, not overwritten.
            manifest = _start_manifest(folder, request, precision, source, sm, trt, versions)
            _run_stages(BuildFolder(folder, manifest, guard), factory, names, request, output)
    except LockedError as err:
        raise BuildError(str(err)) from None
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # nothing was built: leave no empty folder behind
        raise
    return folder


def _run_stages(engine: BuildFolder, factory, names, request: BuildRequest, output) -> None:
    folder, manifest, precision = engine.folder, engine.manifest, factory.precision
    source = factory.source
    for leftover in remove_partials(folder):
        log.warning("removed %s left by an interrupted build", leftover.name)
    log.info("building %s-%s in %s from %s", request.variant, precision, folder, source.label)
    source.prepare("host")
    _run_stage(engine, factory.assets(), output)
    _run_stage(engine, factory.negative(engine), output)
    for name in names:
        source.prepare(GRAPH_COMPONENT[name])
        for stage in factory.graph_stages(name, engine):
            _run_stage(engine, stage, output)
        # every graph we write is one TensorRT's parser takes: checked before any engine stage
        from export import trt_lint  # imports onnx

        trt_lint.check(factory.onnx_path(name, engine), name=name, spec=factory.specs[name],
                       precision=precision)  # fmt: skip
        if request.backend != "tensorrt":
            manifest["graphs"][name] = factory.graph_entry(name, engine)
            engine.save()
    source.release()
    for name in names if request.backend == "tensorrt" else ():
        _run_stage(engine, factory.engine_stage(name, engine), output)
        manifest["graphs"][name] = factory.graph_entry(name, engine)
        engine.save()
    manifest["host"] = host_entries(engine.manifest)
    engine.save()


def _run_stage(engine: BuildFolder, stage, output: BuildLog | None = None) -> None:
    """Run one stage under its progress bar (its line ends with the time and peak memory, or
    'up to date'), the exporters' and quantizers' own output sent to the build log (without
    `output`: no bar, nothing captured)."""
    before = engine.manifest["stages"].get(stage.name)
    with output.stage(stage.name) if output else contextlib.nullcontext({}) as line:
        with resources.peak_rss(stage.name) as measured:
            record = engine.run(stage)
        if record is before:
            line["postfix"] = "up to date"
        else:
            seconds, peak = measured["seconds"], measured["peak_bytes"] / resources.GB
            line["postfix"] = f"{seconds:.1f} s, peak RSS {peak:.1f} GB" + _quality(record)


def _quality(record: dict) -> str:
    error = record.get("quantization", {}).get("error_vs_fp32")
    return f", cosine vs fp32 {error['cosine_mean']:.4f} (held out)" if error else ""


@contextlib.contextmanager
def build_threads(request: BuildRequest) -> Iterator[int | None]:
    """Pin torch's and ONNX Runtime's intra-op threads for the build (`--threads`, else the
    variant's `DEFAULT_THREADS`); None leaves the libraries' defaults. ONNX Runtime sessions
    made meanwhile (our checks, ModelOpt's and quantize_static's calibration sessions, which
    take no options from us) get that many threads unless their options set a number."""
    threads = request.threads or DEFAULT_THREADS[request.variant]
    if threads is None:
        yield None
        return
    import onnxruntime as ort
    import torch

    real, before = ort.InferenceSession, torch.get_num_threads()

    class PinnedSession(real):
        def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):
            options = sess_options or ort.SessionOptions()
            if options.intra_op_num_threads == 0:
                options.intra_op_num_threads = threads
            super().__init__(path_or_bytes, options, *args, **kwargs)

    torch.set_num_threads(threads)
    ort.InferenceSession = PinnedSession
    try:
        yield threads
    finally:
        ort.InferenceSession = real
        torch.set_num_threads(before)


def _start_manifest(folder, request, precision, source, sm, trt, versions) -> dict:
    manifest: dict = {}
    if (folder / "manifest.json").exists() and not request.force:
        try:
            manifest = load_manifest(folder)
        except EngineFolderError as err:
            log.warning("ignoring the unreadable old manifest: %s", err)

    s = source.config.sampler
    manifest.update(
        format=FORMAT_VERSION,
        min_runtime=SCHEMAS[FORMAT_VERSION][1],
        variant=request.variant,
        precision=precision,
        backend=request.backend,
        weights=source.label,
        checkpoint={
            "path": str(source.checkpoint) if source.checkpoint else None,
            "hash": source.hash,
        },
        config=to_dict(source.config),
        template=template_info(request.variant),
        sampler={
            "sampler": s.sampler,
            "steps": s.steps,
            "guidance": s.guidance,
            "decoder_sampler": s.decoder_sampler,
            "decoder_steps": s.decoder_steps,
            "decoder_guidance": s.decoder_guidance,
            "negative_seed": s.negative_seed,
            "decoder_negative": s.decoder_negative,
            "presets": {name: dict(preset) for name, preset in s.presets.items()},
            "image_size": source.config.image_size,
        },
        tools=versions,
        compute_capability=f"{sm[0]}.{sm[1]}" if sm else None,
        tensorrt=trt,
    )
    manifest.setdefault("graphs", {})
    manifest.setdefault("stages", {})
    return manifest


def _print_plan(engine, factory, names, folder, source) -> None:
    stage_names = factory.stage_names(names)
    params = resources.count_params(source.config)
    quantized = [n for n in names if factory.quantized(n)]
    calibration = None
    if quantized:
        prompts, held = factory.calibration_prompts()
        calibration = resources.calibration_cost(
            factory.specs,
            quantized,
            params,
            prompts=len(prompts),
            held_out=len(held),
            steps=factory.calibration_steps(),
            negative_steps=0,  # the negative is a stage of its own: calibration reads it
            device=calibration_device(factory.request.device),
            max_samples=factory.calibration_samples(),
        )
    costs = resources.stage_costs(
        stage_names,
        params,
        precision=factory.precision,
        graph_components=GRAPH_COMPONENT,
        calibration=calibration,
        graph_precisions={n: factory.graph_precision(n) for n in names},
    )
    whole = sum(params.components[c] for c in ("vision", "text", "dit", "unet", "vae"))
    if source.checkpoint is None:  # the seeded pipeline is built whole and held throughout
        costs = resources.held_by_every_stage(costs, whole * resources.BYTES["fp32"])
    *rows, total = resources.format_costs(costs)
    status = dict(_statuses(engine, factory, names))
    print(f"plan for {folder} ({source.label}):")
    print(f"  {'stage':<24} {'status':<22} {'loads':<22} {'peak RAM':>9} {'adds':>9}")
    for name, row in zip(stage_names, rows):
        print(f"  {name:<24} {status[name]:<22} {row}")
    if calibration is not None:
        print(f"  {calibration.describe()}")
    io = io_dtype(factory.precision)
    shown = ", ".join(f"{n} {p}" for n, p in factory.graph_precisions(names).items())
    print(f"  graphs compute in: {shown} (float I/O: {io})")
    request = factory.request
    threads = request.threads or DEFAULT_THREADS[request.variant]
    why = "--threads" if request.threads else f"{request.variant}'s default; --threads N"
    print(f"  threads: torch and ONNX Runtime {threads or 'default (all cores)'} ({why})")
    if source.checkpoint is None:
        print(
            f"  random weights: the whole seeded pipeline ({whole * 4 / resources.GB:.1f} GB "
            "in fp32) is built at once and held by every stage: in each peak above"
        )
    print(f"  estimated: {total} (from parameter counts: README, 'Building 4B/8B on a GPU')")


def _statuses(engine, factory, names):
    for stage_name, stage in factory.preview(names, engine):
        if stage is None:
            yield stage_name, "after its input stage"
        else:
            yield stage_name, "up to date" if engine.up_to_date(stage) else "will run"


__all__ = ["BuildError", "BuildRequest", "build"]
