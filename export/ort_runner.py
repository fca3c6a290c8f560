"""A minimal greedy loop on ONNX Runtime, for validating exports and for benchmarks.

It drives either graph route (fused: GroupQueryAttention KV cache; standard: optimum names with
``position_ids``) through prefill and KV-cached decode, batch 1 or more (same-length prompts).
The edge agent has its own, fuller engine; the exporter must not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeglm.errors import ExportError

__all__ = ["OrtDecoder"]


@dataclass
class _Cache:
    names: list[tuple[str, str]]  # (past input name, present output name)
    kv_heads: int
    head_dim: int
    dtype: type


class OrtDecoder:
    """Prefill + greedy decode over an exported decoder graph."""

    def __init__(self, model: Path, *, threads: int = 0, providers: list[str] | None = None) -> None:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(model), opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ExportError(f"ONNX model {model}", f"does not load in ONNX Runtime: {exc}") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.uses_position_ids = "position_ids" in inputs
        past = sorted(n for n in inputs if n.startswith("past_key_values."))
        first = inputs[past[0]]
        self.cache = _Cache(
            names=[(n, n.replace("past_key_values.", "present.")) for n in past],
            kv_heads=int(first.shape[1]),
            head_dim=int(first.shape[3]),
            dtype=np.float16 if "float16" in first.type else np.float32,
        )

    def _feeds(self, ids: np.ndarray, past: dict[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
        batch, seq = ids.shape
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, total), np.int64),
        }
        if self.uses_position_ids:
            feeds["position_ids"] = np.tile(np.arange(total - seq, total, dtype=np.int64), (batch, 1))
        feeds.update(past)
        return feeds

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        c = self.cache
        return {n: np.zeros((batch, c.kv_heads, 0, c.head_dim), c.dtype) for n, _ in c.names}

    def step(
        self, ids: np.ndarray, past: dict[str, np.ndarray], total: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` after ``past``; return logits [batch, seq, vocab] and the next past."""
        outs = dict(
            zip(self.output_names, self.session.run(None, self._feeds(ids, past, total)), strict=True)
        )
        return outs["logits"], {p: outs[q] for p, q in self.cache.names}

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits for every position of ``ids`` [batch, seq] (one prefill)."""
        logits, _ = self.step(ids, self.empty_past(ids.shape[0]), ids.shape[1])
        return logits.astype(np.float32)

    def greedy(self, ids: np.ndarray, max_new_tokens: int, eos: set[int] | None = None) -> np.ndarray:
        """Greedy continuation [batch, max_new_tokens] (stops early when every row hit eos)."""
        batch, seq = ids.shape
        logits, past = self.step(ids, self.empty_past(batch), seq)
        out = []
        total = seq
        done = np.zeros(batch, bool)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            if eos:
                done |= np.isin(nxt, list(eos))
                if done.all():
                    break
            total += 1
            logits, past = self.step(nxt[:, None], past, total)
        return np.stack(out, axis=1)
