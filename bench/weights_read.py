"""Bytes of weights one batch-1 decode step reads: the roofline's numerator, for both engines.

ONNX (ours): every initializer of ``model.onnx`` (sizes from the graph: external data lengths, the
data file is not read), except those only row-indexed per token: consumed by nothing but
``Gather``/``GatherBlockQuantized`` (the embedding lookup) or ``GroupQueryAttention`` (its RoPE
cos/sin caches), looking through ``Reshape`` views. A tied embedding that is also the lm_head's
``MatMulNBits`` weight counts in full.

GGUF (llama.cpp): every tensor's byte size from the file's tensor table, except ``token_embd`` when
the file has its own ``output`` matrix (then the embedding is a row lookup; tied, it is the output).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

ROW_LOOKUP_OPS = frozenset({"Gather", "GatherBlockQuantized", "GroupQueryAttention"})


def onnx_read_bytes(initializers: Iterable[tuple[str, int, frozenset[str]]]) -> int:
    """Sum of ``(name, bytes, consumer op types)`` over what a decode step reads in full."""
    total = 0
    for _name, size, ops in initializers:
        if ops and ops <= ROW_LOOKUP_OPS:
            continue
        total += size
    return total


def gguf_read_bytes(tensors: Iterable[tuple[str, int]]) -> int:
    """Sum of ``(name, bytes)`` over what a decode step reads in full (see the module docstring)."""
    table = dict(tensors)
    untied = "output.weight" in table
    return sum(size for name, size in table.items() if not (untied and name == "token_embd.weight"))


def onnx_initializers(model: Path) -> list[tuple[str, int, frozenset[str]]]:
    """``(name, bytes, consumer op types)`` of every initializer of ``model`` (weights not loaded)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            users[name].append(node)

    def ops(name: str) -> set[str]:
        """Op types that use ``name``, looking through Reshape (a view ORT folds into the weight)."""
        found: set[str] = set()
        for node in users.get(name, ()):
            if node.op_type == "Reshape" and node.input[0] == name:
                found |= ops(node.output[0])
            else:
                found.add(node.op_type)
        return found

    out = []
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            size = int({e.key: e.value for e in init.external_data}["length"])
        else:
            size = len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
        out.append((init.name, size, frozenset(ops(init.name))))
    return out


def gguf_tensors(path: Path) -> list[tuple[str, int]]:
    """``(name, bytes)`` of every tensor in a GGUF file (the ``gguf`` package reads the table)."""
    from gguf import GGUFReader

    return [(t.name, int(t.n_bytes)) for t in GGUFReader(str(path)).tensors]
