"""The standard route: optimum-onnx exports a GLM decoder as one plain-ONNX graph with a KV cache.

    input_ids                int64 [b, s]         ┐
    attention_mask           int64 [b, p+s]       │    ┌─────────────────┐ ──> logits          [b, s, vocab]
    position_ids             int64 [b, s]         ├──> │ decoder: plain  │ ──> present.N.key   [b, kv, p+s, d]
    past_key_values.N.key    float [b, kv, p, d]  │    │ ONNX, opset 18  │ ──> present.N.value [b, kv, p+s, d]
    past_key_values.N.value  float [b, kv, p, d]  ┘    └─────────────────┘
    N = 0 .. layers - 1; p = 0 for the prefill (empty past tensors), so one graph serves both steps.

``out_dir`` ends up holding ``model.onnx``, ``model.onnx.data`` (every initializer, 64-byte
aligned: the tensor table our delta sync cuts pieces from), ``config.json`` and
``generation_config.json`` — enough for ``optimum.onnxruntime.ORTModelForCausalLM`` to load it.

``glm`` is registered in optimum-onnx (``GLMOnnxConfig``); ``glm4`` (GLM-4-0414) is not, so we hand
optimum :class:`Glm4OnnxConfig` through its custom-config API: its extra post-attention / post-MLP
norms change no graph input or output. This is the only module of the export wing that imports
optimum.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx import TensorProto, numpy_helper
from optimum.exporters.onnx import main_export
from optimum.exporters.onnx.model_configs import GLMOnnxConfig
from packaging import version
from torch.jit._trace import TracerWarning
from transformers import AutoConfig

from edgeglm.errors import ExportError, UnsupportedModel
from export.onnx_writer import ALIGN

__all__ = [
    "DATA_NAME",
    "INLINE_BELOW",
    "SUPPORTED_MODEL_TYPES",
    "Glm4OnnxConfig",
    "export_standard",
    "save_single_data",
]

DATA_NAME = "model.onnx.data"
# Smaller tensors stay in the graph file: axes and shapes that shape inference must read (it cannot
# read external data), where a piece of their own would cost more than it saves.
INLINE_BELOW = 1024
DEFAULT_OPSET = 18  # optimum-onnx's minimum for these decoders; 17 exports but warns
_HF_FILES = ("config.json", "generation_config.json")


class Glm4OnnxConfig(GLMOnnxConfig):  # type: ignore[misc]  # optimum is untyped
    """GLM-4-0414 (``Glm4ForCausalLM``): GLM's inputs and outputs; extra norms live inside the graph."""

    MIN_TRANSFORMERS_VERSION = version.parse("4.51.0")


# model_type -> custom optimum config, or None where optimum-onnx registers the architecture itself.
_ONNX_CONFIGS: dict[str, type[GLMOnnxConfig] | None] = {"glm": None, "glm4": Glm4OnnxConfig}
SUPPORTED_MODEL_TYPES = tuple(sorted(_ONNX_CONFIGS))


def export_standard(
    checkpoint: Path,
    out_dir: Path,
    *,
    model_type: str,
    opset: int = DEFAULT_OPSET,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export the fp32 decoder of ``checkpoint`` to ``out_dir/model.onnx``; returns that path."""
    say = progress or (lambda _: None)
    if model_type not in _ONNX_CONFIGS:
        raise UnsupportedModel(
            f"model_type {model_type!r}",
            f"the standard route supports {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_checkpoint(checkpoint, model_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".optimum-", dir=out_dir) as tmp:
        raw = Path(tmp)
        say(f"tracing {model_type} with optimum-onnx (opset {opset})")
        _run_optimum(checkpoint, raw, model_type, opset)
        say(f"moving every weight into {DATA_NAME}")
        path = save_single_data(onnx.load(raw / "model.onnx", load_external_data=False), out_dir, raw)
        for name in _HF_FILES:
            if (raw / name).is_file():
                shutil.copy2(raw / name, out_dir / name)
    return path


def _check_checkpoint(checkpoint: Path, model_type: str) -> None:
    config = checkpoint / "config.json"
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ExportError(f"checkpoint {checkpoint}", f"cannot read config.json: {exc}") from exc
    if found != model_type:
        raise ExportError(
            f"checkpoint {checkpoint}", f"config.json says model_type {found!r}, not {model_type!r}"
        )


def _run_optimum(checkpoint: Path, out: Path, model_type: str, opset: int) -> None:
    """One fp32 ``text-generation-with-past`` export: a single decoder graph, no merged variants.

    optimum's own validation is off: the pipeline's quality gate compares against transformers.
    """
    custom = _ONNX_CONFIGS[model_type]
    try:
        configs = None
        if custom is not None:
            hf_config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
            configs = {
                "model": custom(hf_config, task="text-generation", use_past=True, use_past_in_inputs=True)
            }
        with warnings.catch_warnings():
            # torch.jit warns on every data-dependent branch of transformers' cache and masks;
            # optimum's patcher makes the trace generic and the quality gate checks the result.
            warnings.simplefilter("ignore", TracerWarning)
            main_export(
                str(checkpoint),
                out,
                task="text-generation-with-past",
                opset=opset,
                device="cpu",
                dtype="fp32",
                local_files_only=True,
                library_name="transformers",
                do_validation=False,
                custom_onnx_configs=configs,
            )
    except Exception as exc:  # optimum, transformers and torch.onnx raise many untyped errors
        raise ExportError(
            f"standard export of {checkpoint}", f"optimum-onnx failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not (out / "model.onnx").is_file():
        found = sorted(p.name for p in out.iterdir())
        raise ExportError(f"standard export of {checkpoint}", f"optimum wrote no model.onnx (found {found})")


def save_single_data(model: onnx.ModelProto, out_dir: Path, source_dir: Path | None = None) -> Path:
    """Write ``model`` as ``out_dir/model.onnx`` with every initializer in ``out_dir/model.onnx.data``.

    Initializers may be inline or external (relative to ``source_dir``); they are copied one at a
    time, so memory stays near the graph plus its largest tensor. ``source_dir`` may be ``out_dir``.
    Top-level ``Constant`` nodes in external data become initializers first: torch.onnx stores big
    ones (causal masks of a long-context model) that way, and the tensor table lists initializers.
    """
    _hoist_constants(model.graph)
    _inline_external_attributes(model.graph, source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f"{DATA_NAME}.partial"
    try:
        with open(partial, "wb") as data:
            _write_initializers(model, data, source_dir)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out_dir / DATA_NAME)
    path = out_dir / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _write_initializers(model: onnx.ModelProto, data: BinaryIO, source_dir: Path | None) -> None:
    offset = 0
    for tensor in _initializers(model.graph):
        if tensor.data_type == TensorProto.STRING:
            continue  # ONNX keeps string tensors inline
        raw = _tensor_bytes(tensor, source_dir)
        if len(raw) < INLINE_BELOW:
            _make_inline(tensor, raw)
            continue
        pad = (-offset) % ALIGN
        data.write(b"\0" * pad)
        offset += pad
        data.write(raw)
        _point_to(tensor, offset, len(raw))
        offset += len(raw)


def _hoist_constants(graph: onnx.GraphProto) -> None:
    """``Constant(value=T) -> y`` with T in external data becomes initializer ``y`` holding T.

    Only those: inline Constants stay nodes, as the exporter wrote them.
    """
    keep = []
    for node in graph.node:
        attrs = [
            a
            for a in node.attribute
            if a.name == "value" and a.HasField("t") and a.t.data_location == TensorProto.EXTERNAL
        ]
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and len(node.attribute) == 1
            and attrs
        ):
            tensor = TensorProto()
            tensor.CopyFrom(attrs[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _inline_external_attributes(graph: onnx.GraphProto, source_dir: Path | None) -> None:
    """Attribute tensors still in external data (Constants inside subgraphs) move into the graph."""
    for node in graph.node:
        for attr in node.attribute:
            for tensor in [attr.t] if attr.HasField("t") else list(attr.tensors):
                if tensor.data_location == TensorProto.EXTERNAL:
                    _make_inline(tensor, _tensor_bytes(tensor, source_dir))
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _inline_external_attributes(sub, source_dir)


def _initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers of ``graph`` and of its subgraphs (If / Loop / Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


def _tensor_bytes(tensor: TensorProto, source_dir: Path | None) -> bytes:
    """The little-endian bytes of ``tensor``, wherever they are stored now."""
    if tensor.data_location == TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in tensor.external_data}
        if source_dir is None:
            raise ExportError(f"tensor {tensor.name}", "is external but no source folder was given")
        length = int(info["length"]) if "length" in info else -1
        with open(source_dir / info["location"], "rb") as src:
            src.seek(int(info.get("offset", 0)))
            raw = src.read(length)
    elif tensor.HasField("raw_data"):
        raw = tensor.raw_data
    else:  # typed fields (float_data, int64_data, ...): let onnx pack them
        raw = numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
    return raw


def _clear(tensor: TensorProto) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]


def _make_inline(tensor: TensorProto, raw: bytes) -> None:
    """A small tensor kept in the graph file (see ``INLINE_BELOW``)."""
    _clear(tensor)
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = raw


def _point_to(tensor: TensorProto, offset: int, length: int) -> None:
    _clear(tensor)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
