"""A serialized TensorRT engine from the standard graph, and its check against the reference.

The only module of the export wing that imports ``tensorrt`` (and ``cuda-python`` for device
memory). An engine only runs on the GPU architecture and TensorRT version it was built with, so
:func:`build_engine` returns both for the manifest; the agent refuses a mismatch and falls back to
the ONNX graph with ONNX Runtime's TensorRT / CUDA providers.

The network is *strongly typed*: the graph already says which tensors are fp16 and which weights
are INT4 / INT8 behind DequantizeLinear (explicit quantization), so no precision flags are set.
Two optimisation profiles cover the two shapes a decoder runs::

    profile 0 "prefill"   input_ids [b, 1..max_seq]   past_key_values.* [b, kv, 0, d]
    profile 1 "decode"    input_ids [b, 1]            past_key_values.* [b, kv, 1..max_seq-1, d]
    b: min_batch..max_batch (tuned at opt_batch); sequences tuned at opt_seq

Nothing here runs without an NVIDIA GPU: :func:`probe` says so up front with
:class:`UnavailableError`, before an export spends minutes on the graph.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm.errors import ExportError, UnavailableError
from edgeglm.profiles import TensorRTSettings

__all__ = ["ENGINE_NAME", "EngineInfo", "EngineRunner", "GpuInfo", "build_engine", "probe"]

ENGINE_NAME = "model.engine"
_HINT = (
    "Export on a machine with the target GPU and 'pip install edgeglm[tensorrt]', or pass "
    "--no-engine to ship the ONNX graph only (the agent runs it with the TensorRT/CUDA provider)."
)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7" on Jetson Orin, "9.0" on H100 / H200
    tensorrt: str


@dataclass(frozen=True)
class EngineInfo:
    file: str
    bytes: int
    seconds: float
    gpu: str
    compute_capability: str
    tensorrt: str
    precision: str
    profiles: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _modules() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UnavailableError(
            "TensorRT engine", "the tensorrt package is not installed", hint=_HINT
        ) from exc
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise UnavailableError("TensorRT engine", "cuda-python is not installed", hint=_HINT) from exc
    return trt, cudart


def _cuda(cudart: Any, result: Any, what: str) -> Any:
    """cuda-python returns ``(error, value...)``; map a CUDA error to ours."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise UnavailableError("CUDA", f"{what} failed: {err}", hint=_HINT)
    return values[0] if len(values) == 1 else (values or None)


def probe() -> GpuInfo:
    """The GPU engines would be built for; :class:`UnavailableError` when there is none."""
    trt, cudart = _modules()
    count = _cuda(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count < 1:
        raise UnavailableError("TensorRT engine", "no NVIDIA GPU is visible", hint=_HINT)
    props = _cuda(cudart, cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = (
        props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    )
    return GpuInfo(name=name, compute_capability=f"{props.major}.{props.minor}", tensorrt=trt.__version__)


def _profile_shapes(
    name: str, static: tuple[int, ...], trt_set: TensorRTSettings
) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) of one input in each of the two profiles (prefill, decode)."""
    b = (trt_set.min_batch, trt_set.opt_batch, trt_set.max_batch)
    seq, opt = trt_set.max_seq, trt_set.opt_seq
    if name.startswith("past_key_values."):
        kv, d = static[1], static[3]
        past = [(0, 0, 0), (1, opt, seq - 1)]
        return [tuple((b[i], kv, p[i], d) for i in range(3)) for p in past]  # type: ignore[misc]
    if name in ("input_ids", "position_ids"):
        steps = [(1, opt, seq), (1, 1, 1)]
    elif name == "attention_mask":
        steps = [(1, opt, seq), (2, opt + 1, seq)]
    else:
        raise ExportError("TensorRT engine", f"unexpected graph input {name!r}")
    return [tuple((b[i], s[i]) for i in range(3)) for s in steps]  # type: ignore[misc]


def build_engine(onnx_path: Path, out_dir: Path, settings: TensorRTSettings) -> EngineInfo:
    """Parse ``onnx_path`` (external data beside it), build, write ``out_dir/model.engine``."""
    gpu = probe()
    trt, _ = _modules()
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT engine from {onnx_path.name}", f"the ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    described = []
    for index, label in enumerate(("prefill", "decode")):
        profile = builder.create_optimization_profile()
        shapes = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shapes[tensor.name] = _profile_shapes(tensor.name, tuple(tensor.shape), settings)[index]
            profile.set_shape(tensor.name, *shapes[tensor.name])
        config.add_optimization_profile(profile)
        described.append({"name": label, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}})
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            f"TensorRT engine from {onnx_path.name}", "the builder returned no engine (see log)"
        )
    path = out_dir / ENGINE_NAME
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as fh:
        fh.write(memoryview(plan))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)
    return EngineInfo(
        file=ENGINE_NAME,
        bytes=path.stat().st_size,
        seconds=round(time.perf_counter() - started, 2),
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt=gpu.tensorrt,
        precision=settings.precision,
        profiles=described,
    )


class _DeviceBuffers:
    """Device allocations for one engine call, freed on exit."""

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self.ptrs: list[int] = []

    def alloc(self, nbytes: int) -> int:
        ptr = int(_cuda(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
        self.ptrs.append(ptr)
        return ptr

    def __enter__(self) -> _DeviceBuffers:
        return self

    def __exit__(self, *_: object) -> None:
        for ptr in self.ptrs:
            self.cudart.cudaFree(ptr)


class EngineRunner:
    """A deserialized engine and one execution context: teacher-forced prefill logits."""

    def __init__(self, engine_path: Path) -> None:
        self.trt, self.cudart = _modules()
        runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT engine {engine_path}", "does not deserialize on this GPU / TensorRT")
        self.path = engine_path
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _input(self, name: str, ids: np.ndarray) -> np.ndarray:
        batch, seq = ids.shape
        dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
        if name == "input_ids":
            return ids.astype(dtype)
        if name == "attention_mask":
            return np.ones((batch, seq), dtype)
        if name == "position_ids":
            return np.tile(np.arange(seq, dtype=dtype), (batch, 1))
        shape = tuple(self.engine.get_tensor_shape(name))  # past_key_values.*: empty for a prefill
        return np.zeros((batch, shape[1], 0, shape[3]), dtype)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] of ``ids`` [batch, seq] in one prefill (profile 0)."""
        trt, cudart, ctx = self.trt, self.cudart, self.context
        stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        outputs: dict[str, tuple[np.ndarray, int]] = {}
        try:
            with _DeviceBuffers(cudart) as buffers:
                ctx.set_optimization_profile_async(0, stream)
                to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                for name in self.names:
                    if self.engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                        continue
                    value = np.ascontiguousarray(self._input(name, ids))
                    ctx.set_input_shape(name, value.shape)
                    ptr = buffers.alloc(value.nbytes)
                    _cuda(cudart, cudart.cudaMemcpy(ptr, value.ctypes.data, value.nbytes, to_device), "copy")
                    ctx.set_tensor_address(name, ptr)
                for name in self.names:
                    if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                        continue
                    host = np.empty(
                        tuple(ctx.get_tensor_shape(name)), trt.nptype(self.engine.get_tensor_dtype(name))
                    )
                    outputs[name] = (host, buffers.alloc(host.nbytes))
                    ctx.set_tensor_address(name, outputs[name][1])
                if not ctx.execute_async_v3(stream):
                    raise ExportError(f"TensorRT engine {self.path}", "execution failed")
                _cuda(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
                host, ptr = outputs["logits"]
                to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
                _cuda(cudart, cudart.cudaMemcpy(host.ctypes.data, ptr, host.nbytes, to_host), "copy")
        finally:
            cudart.cudaStreamDestroy(stream)
        return host.astype(np.float32)
