"""Write an ONNX graph whose weights stream into one external-data file.

Initializers are appended to ``model.onnx.data`` as they are produced (each 64-byte aligned), so
the exporter holds one weight at a time, never the whole model; the graph file itself stays small
and lists each weight's offset and length — the tensor table our delta sync cuts pieces from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["GraphWriter"]

ALIGN = 64
_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


class GraphWriter:
    """Collects nodes, inputs and outputs; streams initializers to ``<out>/model.onnx.data``."""

    def __init__(self, out_dir: Path, data_name: str = "model.onnx.data") -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data_name = data_name
        self._data = open(self.out_dir / data_name, "wb")  # noqa: SIM115 - closed in save()
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self.weight_bytes = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        """Append ``array`` to the data file as initializer ``name``; returns the name."""
        if name in self._names:
            raise ValueError(f"initializer {name} written twice")
        self._names.add(name)
        pad = (-self._offset) % ALIGN
        self._data.write(b"\0" * pad)
        self._offset += pad
        raw = np.ascontiguousarray(array).tobytes()
        self._data.write(raw)
        t = TensorProto(name=name, data_type=_NP_TO_ONNX[array.dtype], dims=list(array.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_name),
            ("offset", str(self._offset)),
            ("length", str(len(raw))),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(t)
        self._offset += len(raw)
        self.weight_bytes += len(raw)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """A small constant kept inside the graph file (shapes, axes)."""
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        self._names.add(name)
        return name

    def node(
        self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs: Any
    ) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0]

    def input(self, name: str, elem: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def save(self, graph_name: str, opset: int = 21) -> Path:
        self._data.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
            producer_name="edgeglm",
        )
        model.ir_version = 10
        path = self.out_dir / "model.onnx"
        onnx.save_model(model, str(path))
        return path
