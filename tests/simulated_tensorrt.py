"""The simulated `tensorrt` module: the runtime half (engines computed by ONNX Runtime) and the
builder half (parses an ONNX, records the configuration, writes a simulated plan).

Names, enum members and values, dtype names (`BF16`, not `BFLOAT16`) and return conventions
follow the real bindings; `tests/test_trt_conformance.py` checks every call our code makes here
against the real TensorRT 10.3 and 11.x bindings. The rules a GPU enforces are kept:
`set_tensor_address` returns False for an address that is not 256-byte aligned or a tensor the
engine lacks; `set_input_shape` for a wrong name or rank; `execute_async_v3` takes an int stream
handle only (a `cudaStream_t` object is a TypeError, as in pybind11) and returns False when an
address, an input shape or the activation memory is missing, or the thread's current device is
not the engine's. The builder refuses precision flags on a strongly typed network, and its
config starts with TF32 on, as TensorRT's does. `BuilderFlag` and `MemoryPoolType` are in the
lean bindings (values checked); the builder's classes and `NetworkDefinitionCreationFlag` are
not (the builder bindings cannot be imported without libnvinfer): only their names are checked.
"""

from __future__ import annotations

import enum
import types
from pathlib import Path

import numpy as np

from tests.simulated_device import PLAN_MAGIC, TRT_VERSION, Device, SimulatedDeviceError

_ORT_TYPES = {"float": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64",
              "int32": "INT32", "bool": "BOOL", "int8": "INT8", "uint8": "UINT8"}  # fmt: skip
_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 16: "BF16", 7: "INT64", 6: "INT32", 9: "BOOL", 3: "INT8",
               2: "UINT8"}  # fmt: skip
_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32",
          "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}  # fmt: skip


class DataType(enum.IntEnum):  # tensorrt.DataType: names and values of TensorRT 10.3+
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class TensorLocation(enum.IntEnum):
    DEVICE = 0
    HOST = 1


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Severity(enum.IntEnum):  # tensorrt.ILogger.Severity
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):  # TensorRT 10.x; 11 has no precision flags (typed only)
    FP16 = 0
    INT8 = 1
    TF32 = 6
    FP8 = 15
    BF16 = 17


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


TYPE_FLAGS = {BuilderFlag.FP16, BuilderFlag.INT8, BuilderFlag.FP8, BuilderFlag.BF16}


class Dims(tuple):
    """tensorrt.Dims: a sequence of ints."""


class IHostMemory(bytes):
    """tensorrt.IHostMemory: a buffer (bytes here)."""


class ILogger:
    Severity = Severity


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self, min_severity=Severity.WARNING) -> None:
        self.min_severity = Severity(min_severity)


def trt_module(device: Device) -> types.ModuleType:
    import onnxruntime as ort

    class ICudaEngine:
        def __init__(self, onnx: bytes) -> None:
            self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
            ins, outs = self.session.get_inputs(), self.session.get_outputs()
            self.io = [(t, TensorIOMode.INPUT) for t in ins] + [
                (t, TensorIOMode.OUTPUT) for t in outs
            ]
            self.device = device.current
            self.device_memory_size_v2 = 4096

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, index: int) -> str:
            return self.io[index][0].name

        def _tensor(self, name):
            return next(t for t, _ in self.io if t.name == name)

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return next((m for t, m in self.io if t.name == name), TensorIOMode.NONE)

        def get_tensor_dtype(self, name: str) -> DataType:
            kind = self._tensor(name).type[len("tensor(") : -1]
            return DataType[_ORT_TYPES[kind]]

        def get_tensor_location(self, name: str) -> TensorLocation:
            host = name in getattr(device, "host_tensors", ())
            return TensorLocation.HOST if host else TensorLocation.DEVICE

        def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
            if strategy is not ExecutionContextAllocationStrategy.USER_MANAGED:
                raise SimulatedDeviceError("the runtime manages activation memory itself")
            return IExecutionContext(self)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine, self.addresses, self.shapes = engine, {}, {}
            self.memory, self._outputs = None, None

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if not isinstance(memory, int):
                raise TypeError(f"set_tensor_address(): incompatible arguments: {memory!r}")
            if self.engine.get_tensor_mode(name) is TensorIOMode.NONE or memory % 256:
                return False  # TensorRT logs an error and leaves the address as it was
            self.addresses[name] = memory
            return True

        def set_input_shape(self, name: str, shape) -> bool:
            if self.engine.get_tensor_mode(name) is not TensorIOMode.INPUT:
                return False
            shape = tuple(int(n) for n in shape)
            if len(shape) != len(self.engine._tensor(name).shape) or min(shape, default=0) < 0:
                return False
            self.shapes[name], self._outputs = shape, None
            return True

        def set_device_memory(self, memory: int, size: int) -> None:
            self.memory = (int(memory), int(size))

        def _dtype(self, name):
            return np.dtype(_NUMPY[self.engine.get_tensor_dtype(name).name])

        def _run(self, addresses, shapes):
            """Read inputs at `addresses`, run ONNX Runtime, return {output: array}."""
            feeds = {}
            for t, mode in self.engine.io:
                if mode is TensorIOMode.INPUT:
                    shape, dtype = shapes[t.name], self._dtype(t.name)
                    raw = device.view(addresses[t.name], int(np.prod(shape)) * dtype.itemsize)
                    feeds[t.name] = raw.view(dtype).reshape(shape).copy()
            names = [t.name for t, m in self.engine.io if m is TensorIOMode.OUTPUT]
            return dict(zip(names, self.engine.session.run(names, feeds)))

        def get_tensor_shape(self, name: str) -> Dims:
            if self._outputs is None:  # shape inference: run on zeros
                names = [t.name for t, m in self.engine.io if m is TensorIOMode.OUTPUT]
                zeros = {n: np.zeros(s, self._dtype(n)) for n, s in self.shapes.items()}
                outs = self.engine.session.run(names, zeros)
                self._outputs = {n: o.shape for n, o in zip(names, outs)}
            return Dims(self.shapes.get(name) or self._outputs[name])

        def execute_async_v3(self, stream_handle: int) -> bool:
            if type(stream_handle) is not int:  # pybind11 takes an int, not a cudaStream_t
                raise TypeError(f"execute_async_v3(): incompatible arguments: {stream_handle!r}")
            names = [t.name for t, _ in self.engine.io]
            inputs = [t.name for t, m in self.engine.io if m is TensorIOMode.INPUT]
            if (
                device.current != self.engine.device
                or device.streams.get(stream_handle) != self.engine.device
                or self.memory is None
                or any(n not in self.addresses for n in names)
                or any(n not in self.shapes for n in inputs)
            ):
                return False  # TensorRT logs the reason and enqueues nothing
            addresses, shapes, memory = dict(self.addresses), dict(self.shapes), self.memory

            def work():
                device.executions += 1
                scratch = device.view(memory[0], memory[1])
                if memory[1] < self.engine.device_memory_size_v2:
                    raise SimulatedDeviceError("activation memory smaller than the engine needs")
                outputs = self._run(addresses, shapes)
                scratch[:] = np.random.default_rng().integers(0, 255, scratch.size, np.uint8)
                for name, value in outputs.items():
                    value = np.ascontiguousarray(value)
                    device.view(addresses[name], value.nbytes)[:] = value.view(np.uint8).ravel()

            device.launches += 1
            device.enqueue(stream_handle, work)
            return True

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
            data = bytes(serialized_engine)
            if not data.startswith(PLAN_MAGIC):
                return None
            return ICudaEngine(data[len(PLAN_MAGIC) :])

    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION
    for value in (ICudaEngine, IExecutionContext, Runtime, Logger, ILogger, DataType, Dims,
                  TensorIOMode, TensorLocation, ExecutionContextAllocationStrategy,
                  IHostMemory):  # fmt: skip
        setattr(trt, value.__name__, value)
    _builder(trt, device)
    return trt


def _builder(trt, device: Device) -> None:
    """The builder half: what `export.trt_build.build_engine` calls."""
    import onnx

    class ITensor:
        def __init__(self, name: str, dtype: DataType) -> None:
            self.name, self.dtype = name, dtype

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.onnx = flags, [], None

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> ITensor:
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> str:
            return self.errors[index]

        def parse_from_file(self, model: str) -> bool:
            try:
                proto = onnx.load(model)
            except Exception as err:  # noqa: BLE001 - the parser reports, never raises
                self.errors.append(f"cannot read {model}: {err}")
                return False
            initializers = {t.name for t in proto.graph.initializer}
            self.network.inputs = [
                ITensor(i.name, DataType[_ONNX_TYPES[i.type.tensor_type.elem_type]])
                for i in proto.graph.input
                if i.name not in initializers
            ]
            self.network.onnx = Path(model).read_bytes()
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 - real names
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data) or b"SIMULATED-TIMING-CACHE"

        def serialize(self) -> IHostMemory:
            return IHostMemory(self.data)

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags = {BuilderFlag.TF32}  # TensorRT's default: TF32 on
            self.pools, self.profiles, self.cache = {}, [], None

        def set_flag(self, flag: BuilderFlag) -> None:
            self.flags.add(BuilderFlag(flag))

        def clear_flag(self, flag: BuilderFlag) -> None:
            self.flags.discard(BuilderFlag(flag))

        def get_flag(self, flag: BuilderFlag) -> bool:
            return BuilderFlag(flag) in self.flags

        def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
            self.pools[MemoryPoolType(pool)] = int(pool_size)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(dict(profile.shapes))
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache:
            return self.cache

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(int(flags))

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network, config) -> IHostMemory | None:
            typed = network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            if typed and config.flags & TYPE_FLAGS:
                return None  # TensorRT: precision flags are invalid on strongly typed networks
            device.builds.append(
                dict(
                    network_flags=network.flags,
                    flags=set(config.flags),
                    pools=config.pools,
                    profiles=config.profiles,
                )  # fmt: skip
            )
            return IHostMemory(PLAN_MAGIC + network.onnx)

    device.builds = []
    for value in (Builder, OnnxParser, INetworkDefinition, IBuilderConfig, IOptimizationProfile,
                  ITimingCache, ITensor, NetworkDefinitionCreationFlag, BuilderFlag,
                  MemoryPoolType):  # fmt: skip
        setattr(trt, value.__name__, value)
    names = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64",
             "int32": "INT32", "bool": "BOOL", "int8": "INT8", "uint8": "UINT8"}  # fmt: skip
    for alias, member in names.items():
        setattr(trt, alias, DataType[member])
