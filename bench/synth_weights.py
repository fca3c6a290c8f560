"""Synthetic transformer weights laid out like ONNX external data, and realistic update pairs.

A "model" is an ordered list of named numpy arrays. ``write_model`` writes them as one
external-data file (each tensor 64-byte aligned, in order) plus a small ``model.onnx`` whose
initializers point into it — exactly what an ONNX exporter produces — so the code under test
reads the tensor table from the graph as it would in production.

Update pairs (``make_pair``), from a base fp32 model:

    A  10% of tensors fine-tuned: every value of those tensors moves a little
    B  A, plus one new tensor inserted near the start (shifts every offset after it)
    C  a rank-8 update merged into every attention projection
    D  everything changed: every tensor fine-tuned further (fp32); int8: the same fp32 weights
       re-quantized with a different calibration (99.9th-percentile clipping instead of max)

int8 models hold per-row symmetric int8 matrices with float32 scales (re-quantized after every
fp32 change, as an int8 export would be); norms and biases stay float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CASES", "Dims", "base_model", "make_pair", "quantize_int8", "write_model"]

ALIGN = 64
CASES = ("A", "B", "C", "D")

Model = list[tuple[str, np.ndarray]]


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    kv: int
    layers: int
    vocab: int

    @classmethod
    def full(cls) -> Dims:  # ~290 MB fp32, 182 tensors
        return cls(hidden=512, intermediate=1536, kv=128, layers=20, vocab=16384)

    @classmethod
    def quick(cls) -> Dims:  # ~70 MB fp32
        return cls(hidden=256, intermediate=768, kv=64, layers=20, vocab=8192)

    @classmethod
    def tiny(cls) -> Dims:  # ~1.5 MB, for unit tests
        return cls(hidden=64, intermediate=192, kv=16, layers=3, vocab=1024)


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def base_model(dims: Dims, seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    h, i, kv = dims.hidden, dims.intermediate, dims.kv

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.05, n)).astype(np.float32)

    model: Model = [("model.embed_tokens.weight", mat(dims.vocab, h))]
    for n in range(dims.layers):
        p = f"model.layers.{n}"
        model += [
            (f"{p}.input_layernorm.weight", norm(h)),
            (f"{p}.self_attn.q_proj.weight", mat(h, h)),
            (f"{p}.self_attn.k_proj.weight", mat(kv, h)),
            (f"{p}.self_attn.v_proj.weight", mat(kv, h)),
            (f"{p}.self_attn.o_proj.weight", mat(h, h)),
            (f"{p}.post_attention_layernorm.weight", norm(h)),
            (f"{p}.mlp.gate_up_proj.weight", mat(2 * i, h)),
            (f"{p}.mlp.down_proj.weight", mat(h, i)),
            (f"{p}.self_attn.qkv_bias", rng.normal(0.0, 0.01, h + 2 * kv).astype(np.float32)),
        ]
    model.append(("model.norm.weight", norm(h)))
    return model


def _finetune(w: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    return (w + rng.normal(0.0, scale, w.shape)).astype(np.float32)


def make_pair(base: Model, case: str, seed: int = 1) -> Model:
    """The fp32 model after update ``case`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    new = [(name, w.copy()) for name, w in base]
    if case in ("A", "B"):
        picked = rng.choice(len(new), size=max(1, len(new) // 10), replace=False)
        for k in picked:
            name, w = new[k]
            new[k] = (name, _finetune(w, rng, 2e-4 if w.ndim == 2 else 1e-3))
        if case == "B":
            h = base[0][1].shape[1]
            adapter = rng.normal(0.0, 0.02, (h, 64)).astype(np.float32)
            new.insert(2, ("model.layers.0.adapter.weight", adapter))
    elif case == "C":
        for k, (name, w) in enumerate(new):
            if any(f"self_attn.{a}." in name for a in ATTN):
                u = rng.normal(0.0, 1.0, (w.shape[0], 8)).astype(np.float32)
                v = rng.normal(0.0, 1.0, (8, w.shape[1])).astype(np.float32)
                new[k] = (name, (w + 2e-4 / np.sqrt(8) * (u @ v)).astype(np.float32))
    elif case == "D":
        new = [(name, _finetune(w, rng, 1e-3 if w.ndim == 2 else 5e-3)) for name, w in new]
    else:
        raise ValueError(f"unknown case {case!r}")
    return new


def quantize_int8(model: Model, *, percentile: float | None = None) -> Model:
    """Per-row symmetric int8 for matrices (+ a float32 ``.scale``); vectors stay float32."""
    out: Model = []
    for name, w in model:
        if w.ndim != 2:
            out.append((name, w))
            continue
        a = np.abs(w)
        peak = np.percentile(a, percentile, axis=1) if percentile else a.max(axis=1)
        scale = (np.maximum(peak, 1e-8) / 127.0).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        out += [(name, q), (name + ".scale", scale)]
    return out


_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.int8): 3, np.dtype(np.uint8): 2, np.dtype(np.float16): 10}


def write_model(
    model: Sequence[tuple[str, np.ndarray]], folder: Path, data_name: str = "model.onnx.data"
) -> Path:
    """Write ``folder/model.onnx`` + ``folder/<data_name>`` (64-byte aligned tensors); return the folder."""
    import onnx
    from onnx import TensorProto, helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    initializers = []
    with open(folder / data_name, "wb") as fh:
        offset = 0
        for name, arr in model:
            pad = (-offset) % ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            raw = np.ascontiguousarray(arr).tobytes()
            fh.write(raw)
            t = TensorProto()
            t.name = name
            t.data_type = _ONNX_TYPES[arr.dtype]
            t.dims.extend(arr.shape)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(t)
            offset += len(raw)
    first = model[0][0]
    graph = helper.make_graph(
        [helper.make_node("Identity", [first], ["out"])],
        "synthetic",
        [],
        [helper.make_tensor_value_info("out", _ONNX_TYPES[model[0][1].dtype], list(model[0][1].shape))],
        initializer=initializers,
    )
    onnx.save_model(helper.make_model(graph), str(folder / "model.onnx"))
    return folder
