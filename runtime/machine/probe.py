"""What this machine has: Python, numpy, ONNX Runtime, CUDA, GPUs, TensorRT, Jetson model.

Every probe is read-only, cheap and never fails: a missing tool gives None, not an exception,
because `doctor` must work on exactly the machines where something is missing. Facts are frozen
dataclasses so that tests (and the decisions in `runtime.machine.compat`) take them as plain data:
fake a GPU by building a `Facts`, not by patching the probes. nvidia-smi runs without a shell,
with a timeout; CUDA's driver API is read through ctypes (no cuda-python, no context created).
"""

from __future__ import annotations

import csv
import ctypes
import importlib.metadata
import json
import logging
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Distributions that install the `onnxruntime` Python module: any two in one environment
# overwrite each other's files, and whichever was installed last wins.
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
)
SMI_FIELDS = ("index", "name", "compute_cap", "memory.free", "memory.total", "driver_version")
SMI_TIMEOUT_S = 10
JETSON_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int] | None
    memory_free_mib: int | None = None
    memory_total_mib: int | None = None


@dataclass(frozen=True)
class OrtFacts:
    """The installed onnxruntime distributions {name: version}, and what the module says."""

    distributions: tuple[tuple[str, str], ...] = ()
    version: str | None = None
    providers: tuple[str, ...] = ()
    error: str | None = None  # why `import onnxruntime` failed, when it did


@dataclass(frozen=True)
class Facts:
    python: str
    platform: str
    numpy: str | None
    ort: OrtFacts
    driver: str | None = None  # NVIDIA driver version
    cuda: str | None = None  # the newest CUDA the driver runs ('12.4')
    gpus: tuple[Gpu, ...] = ()
    gpu_source: str | None = None  # 'nvidia-smi' or 'libcuda'
    tensorrt: str | None = None
    cuda_python: str | None = None
    jetson: str | None = None  # /proc/device-tree/model
    l4t: str | None = None  # /etc/nv_tegra_release ('R36.4.0')

    @property
    def sm(self) -> tuple[int, int] | None:
        """Compute capability of the first GPU (the one the runtime and the exporter use)."""
        return self.gpus[0].compute_capability if self.gpus else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ort"]["distributions"] = dict(self.ort.distributions)
        data["sm"] = None if self.sm is None else f"{self.sm[0]}.{self.sm[1]}"
        return json.loads(json.dumps(data))  # tuples as lists: what --json prints


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def ort_facts() -> OrtFacts:
    """Which onnxruntime distributions are installed, the module's version and providers."""
    dists = tuple((d, v) for d in ORT_DISTRIBUTIONS if (v := _version(d)) is not None)
    try:
        import onnxruntime as ort

        return OrtFacts(dists, ort.__version__, tuple(ort.get_available_providers()))
    except Exception as err:  # ImportError, or a broken mix of two distributions
        return OrtFacts(dists, error=f"{type(err).__name__}: {err}")


def parse_compute_cap(text: str) -> tuple[int, int] | None:
    """'8.7' (nvidia-smi's compute_cap) -> (8, 7); None when unreadable ('[N/A]', '')."""
    major, _, minor = text.strip().partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return None
    return int(major), int(minor)


def _int(text: str) -> int | None:
    text = text.strip()
    return int(float(text)) if text.replace(".", "", 1).isdigit() else None


def parse_nvidia_smi(text: str) -> tuple[list[Gpu], str | None]:
    """GPUs and the driver version from `nvidia-smi --query-gpu=<SMI_FIELDS> --format=csv,
    noheader,nounits` ('0, NVIDIA H200, 9.0, 140000, 143771, 570.86.15' per GPU)."""
    gpus, driver = [], None
    for row in csv.reader(text.strip().splitlines(), skipinitialspace=True):
        if len(row) != len(SMI_FIELDS):
            continue
        _, name, cap, free, total, drv = (v.strip() for v in row)
        gpus.append(Gpu(name, parse_compute_cap(cap), _int(free), _int(total)))
        driver = driver or (drv if drv and not drv.startswith("[") else None)
    return gpus, driver


def nvidia_smi() -> tuple[list[Gpu], str | None] | None:
    """(GPUs, driver version) from nvidia-smi, or None when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    try:
        result = subprocess.run(
            query, capture_output=True, text=True, timeout=SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.debug("nvidia-smi failed: %s", err)
        return None
    if result.returncode != 0:
        log.debug("nvidia-smi exited %d: %s", result.returncode, result.stderr.strip())
        return None
    return parse_nvidia_smi(result.stdout)


def _libcuda():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def libcuda() -> tuple[list[Gpu], str | None]:
    """(GPUs, CUDA version) from CUDA's driver API; ([], None) without a driver."""
    cuda = _libcuda()
    if cuda is None:
        return [], None
    try:
        return _libcuda_facts(cuda)
    except (AttributeError, OSError) as err:  # an old or partial driver library
        log.debug("libcuda failed: %s", err)
        return [], None


def _libcuda_facts(cuda) -> tuple[list[Gpu], str | None]:
    value, version = ctypes.c_int(), None
    if cuda.cuDriverGetVersion(ctypes.byref(value)) == 0:
        version = f"{value.value // 1000}.{value.value % 1000 // 10}"  # 12040 -> '12.4'
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(value)) != 0:
        return [], version
    gpus = []
    for index in range(value.value):
        device, name, total = ctypes.c_int(), ctypes.create_string_buffer(256), ctypes.c_size_t()
        major, minor = ctypes.c_int(), ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
            continue
        cuda.cuDeviceGetName(name, len(name), device)
        ok = cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) == 0  # CC major
        ok = ok and cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) == 0  # CC minor
        has_total = cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device) == 0
        cc = (major.value, minor.value) if ok else None
        mib = total.value >> 20 if has_total else None
        gpus.append(Gpu(name.value.decode(errors="replace"), cc, None, mib))
    return gpus, version


def visible_gpus() -> tuple[list[Gpu], str | None, str | None, str | None]:
    """(GPUs, driver version, CUDA version, source): nvidia-smi first, else CUDA's driver API."""
    smi = nvidia_smi()
    cuda_gpus, cuda_version = libcuda()
    if smi and smi[0]:
        return smi[0], smi[1], cuda_version, "nvidia-smi"
    return cuda_gpus, None, cuda_version, "libcuda" if cuda_gpus else None


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace").strip("\x00\n ") or None
    except OSError:
        return None


def parse_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.0, GCID: ...' -> 'R36.4.0'."""
    head, _, rest = text.partition("(release), REVISION:")
    release, revision = head.strip("# ").strip(), rest.split(",")[0].strip()
    return f"{release}.{revision}" if release.startswith("R") and revision else None


def mem_available_mib(text: str) -> int | None:
    """MemAvailable from /proc/meminfo: a Jetson's GPU shares the host's memory."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) >> 10
    return None


def tensorrt_version() -> str | None:
    """TensorRT's version when `import tensorrt` works (pip's wheel or JetPack's bindings)."""
    try:
        import tensorrt
    except Exception:  # ImportError, or an OSError of a missing libnvinfer
        return None
    return getattr(tensorrt, "__version__", None)


def machine_facts() -> Facts:
    """Probe everything; a missing tool leaves its fields None."""
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    gpus, driver, cuda_version, source = visible_gpus()
    model, tegra = _read(JETSON_MODEL), _read(TEGRA_RELEASE)
    jetson = model if model and (tegra or "jetson" in model.lower()) else None
    if jetson and gpus and gpus[0].memory_free_mib is None:  # unified memory: the host's
        meminfo = _read(MEMINFO)
        free = mem_available_mib(meminfo) if meminfo else None
        gpus = [Gpu(gpus[0].name, gpus[0].compute_capability, free, gpus[0].memory_total_mib)]
    return Facts(
        python=sys.version.split()[0],
        platform=f"{platform.system()} {platform.machine()}",
        numpy=numpy_version,
        ort=ort_facts(),
        driver=driver,
        cuda=cuda_version,
        gpus=tuple(gpus),
        gpu_source=source,
        tensorrt=tensorrt_version(),
        cuda_python=_version("cuda-python") or _version("cuda-bindings"),
        jetson=jetson,
        l4t=parse_tegra_release(tegra) if tegra else None,
    )
