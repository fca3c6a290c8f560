"""Weights for the standard graph in plain ONNX ops: fp16, or QDQ weight-only int8 / int4.

Every MatMul whose B is a constant weight ``W [K, N]`` gets a DequantizeLinear in front; the
activations stay float, so TensorRT and every ONNX Runtime provider can run the graph::

    int4:  W_q  int4 [K, N] ────────┐
           scale T [K / bs, N] ─────┴─ DequantizeLinear(axis=0, block_size=bs) ─> MatMul(x, ·)
           symmetric, blockwise along K (opset 21: the form TensorRT's INT4 weight-only reads),
           each block's scale by least-squares search (export/quant.py); the lm_head (the MatMul
           that makes ``logits``) as int8 below: it decides every token

    int8:  W_q  int8 [K, N] ────────┐
           scale T [N] ─────────────┴─ DequantizeLinear(axis=1) ─────────────────> MatMul(x, ·)
           symmetric, per output channel (TensorRT runs INT8 weights per channel, not blockwise)

    fp16:  weights and compute in fp16; the KV cache inputs/outputs become fp16 too (profiles pair
           fp16 weights with an fp16 cache), ``logits`` stays fp32. RMSNorm's Pow / ReduceMean /
           Sqrt stay fp32: squaring a hidden state above 256 overflows fp16.

T is the activation type: fp32, or fp16 when the graph is converted to fp16 first (TensorRT
profiles with an fp16 KV cache). ``block_size`` applies to int4 only. The output is
``out_dir/model.onnx`` plus one ``model.onnx.data``. With fp32 activations weights are read one
at a time; fp16 holds the whole model in memory (ONNX Runtime's converter works on a ModelProto).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from edgeglm.errors import ExportError
from export.quant import search_scales
from export.standard import save_single_data

__all__ = ["WEIGHTS", "quantize_standard"]

_FP16_KEEP_FP32_OPS = ("Pow", "ReduceMean", "Sqrt")
_FLOAT_WEIGHTS = (TensorProto.FLOAT, TensorProto.FLOAT16)
_FP32_IO = ["logits"]
_BLOCKWISE_OPSET = 21  # DequantizeLinear's block_size and the int4 type
_IR_INT4 = 10

# A weight quantizer: W [K, N] -> (quantized tensor, scale tensor, DequantizeLinear attributes).
QuantizeFn = Callable[[np.ndarray, str, int], tuple[TensorProto, TensorProto, dict[str, Any]]]


def _int8_per_channel(
    w: np.ndarray, name: str, block_size: int
) -> tuple[TensorProto, TensorProto, dict[str, Any]]:
    """``w ≈ q * scale[n]``, q in [-127, 127]."""
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax == 0, 1.0, amax / 127.0).astype(w.dtype)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return (
        numpy_helper.from_array(q, f"{name}_q8"),
        numpy_helper.from_array(scale, f"{name}_q8_scale"),
        {"axis": 1},
    )


def _int4_blockwise(
    w: np.ndarray, name: str, block_size: int
) -> tuple[TensorProto, TensorProto, dict[str, Any]]:
    """``w[k, n] ≈ q[k, n] * scale[k // bs, n]``, q in [-7, 7]; K is padded to whole blocks.

    Each block's scale comes from the least-squares search of export/quant.py (never worse than
    round-to-nearest with the largest |w| on ±7).
    """
    k, n = w.shape
    if not np.isfinite(w).all():  # the search would hide a NaN (every candidate scores NaN)
        raise ValueError(f"weight {name!r} has NaN or infinite values; it cannot be quantized")
    blocks = -(-k // block_size)
    padded = np.pad(w.astype(np.float32), ((0, blocks * block_size - k), (0, 0))).reshape(
        blocks, block_size, n
    )
    scale = np.abs(search_scales(padded.transpose(0, 2, 1), -7, 7))  # [blocks, n]; ±s store the same grid
    q = np.clip(np.rint(padded / scale[:, None, :]), -7, 7).reshape(blocks * block_size, n)[:k]
    scale = scale.astype(w.dtype)
    return (
        numpy_helper.from_array(q.astype(ml_dtypes.int4), f"{name}_q4"),
        numpy_helper.from_array(scale, f"{name}_q4_scale"),
        {"axis": 0, "block_size": block_size},
    )


def _qdq(
    model: onnx.ModelProto,
    base_dir: Path,
    quantize: QuantizeFn,
    block_size: int,
    head: QuantizeFn | None = None,
) -> onnx.ModelProto:
    """Replace each constant 2-D float (fp32 or fp16) MatMul weight by quantize -> DequantizeLinear.

    ``head``, where given, quantizes the lm_head instead: the MatMul whose output is ``logits``.

    Weights are read one at a time (from ``base_dir`` when external), quantized and dropped; the
    scales keep the weight's float type, so DequantizeLinear yields what the MatMul already ate.
    The DequantizeLinear nodes read only initializers, so they go first in node order.
    """
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    head_out = _logits_source(graph)
    dequantize = []
    for node in graph.node:
        tensor = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if tensor is None or tensor.data_type not in _FLOAT_WEIGHTS or len(tensor.dims) != 2:
            continue
        name = tensor.name
        fn = head if head is not None and node.output[0] == head_out else quantize
        q, scale, attrs = fn(numpy_helper.to_array(tensor, base_dir=str(base_dir)), name, block_size)
        graph.initializer.remove(tensor)
        del weights[name]  # a weight shared by two MatMuls is dequantized once
        graph.initializer.extend([q, scale])
        dequantize.append(
            helper.make_node("DequantizeLinear", [q.name, scale.name], [name], name=f"{name}_dq", **attrs)
        )
    nodes = [*dequantize, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    # int4 and fp16 scales need DequantizeLinear-21. Opsets 19-21 only widened the types of the
    # ops torch.onnx emits; the checker in quantize_standard verifies.
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, _BLOCKWISE_OPSET)
    model.ir_version = max(model.ir_version, _IR_INT4)
    return model


def _logits_source(graph: onnx.GraphProto) -> str:
    """The tensor ``logits`` is computed from, through any Cast / Identity (fp16 graphs cast it)."""
    producer = {out: node for node in graph.node for out in node.output}
    name = "logits"
    while name in producer and producer[name].op_type in ("Cast", "Identity"):
        name = producer[name].input[0]
    return name


def _load(src: Path, activations: str) -> onnx.ModelProto:
    """The fp32 graph without its weights, or converted to fp16 (weights in memory then)."""
    if activations == "fp32":
        return onnx.load(src, load_external_data=False)
    model = convert_float_to_float16(
        str(src),  # a path: shape inference then works on models over 2 GB
        keep_io_types=_FP32_IO,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *_FP16_KEEP_FP32_OPS],
    )
    _toposort(model.graph)  # the converter appends its Casts at the end; TensorRT wants order
    return model


def _fp32(src: Path, block_size: int, activations: str) -> onnx.ModelProto:
    return _load(src, "fp32")


def _fp16(src: Path, block_size: int, activations: str) -> onnx.ModelProto:
    return _load(src, "fp16")


def _toposort(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` so every node follows its producers (stable Kahn's algorithm)."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    waiting = [{producer[x] for x in node.input if x in producer} for node in graph.node]
    consumers: list[list[int]] = [[] for _ in graph.node]
    for i, deps in enumerate(waiting):
        for d in deps:
            consumers[d].append(i)
    ready = [i for i, deps in enumerate(waiting) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in consumers[i]:
            waiting[c].discard(i)
            if not waiting[c]:
                heapq.heappush(ready, c)
    if len(order) != len(graph.node):
        raise ExportError("fp16 graph", "has a cycle; cannot order its nodes")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _int8(src: Path, block_size: int, activations: str) -> onnx.ModelProto:
    return _qdq(_load(src, activations), src.parent, _int8_per_channel, block_size)


def _int4(src: Path, block_size: int, activations: str) -> onnx.ModelProto:
    """int4 blockwise, the lm_head int8 per channel (llama.cpp keeps its output matrix at 6 bits too)."""
    return _qdq(_load(src, activations), src.parent, _int4_blockwise, block_size, head=_int8_per_channel)


WEIGHTS: dict[str, Callable[[Path, int, str], onnx.ModelProto]] = {
    "fp32": _fp32,
    "fp16": _fp16,
    "int8": _int8,
    "int4": _int4,
}


def quantize_standard(
    src_onnx: Path, out_dir: Path, *, weights: str, block_size: int, activations: str = "fp32"
) -> Path:
    """Write the fp32 standard graph ``src_onnx`` with ``weights`` as ``out_dir/model.onnx``.

    ``activations="fp16"`` (int8 / int4 only; fp16 weights imply it) converts the graph to fp16
    first, so the quantized weights dequantize straight to fp16: what a strongly typed TensorRT
    network with fp16 activations and its fp16 KV cache needs.
    """
    src_onnx, out_dir = Path(src_onnx), Path(out_dir)
    convert = WEIGHTS.get(weights)
    if convert is None:
        raise ExportError(f"weights {weights!r}", f"the standard route supports {', '.join(WEIGHTS)}")
    if activations not in ("fp32", "fp16"):
        raise ExportError(f"activations {activations!r}", "must be fp32 or fp16")
    if weights == "int4" and block_size < 2:
        raise ExportError(f"block_size {block_size}", "int4 needs a block of at least 2 weights")
    try:
        path = save_single_data(convert(src_onnx, block_size, activations), out_dir, src_onnx.parent)
        onnx.checker.check_model(str(path))
    except ExportError:
        raise
    except Exception as exc:  # onnx and ONNX Runtime's converter raise many untyped errors
        raise ExportError(f"{weights} conversion of {src_onnx}", f"{type(exc).__name__}: {exc}") from exc
    return path
