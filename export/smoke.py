"""The golden smoke test a bundle carries: the export's greedy tokens and logits, and a tolerance.

A device checks a newly loaded model against this record (``edge_agent/smoke.py`` holds the
rule). The tokens and the reference logits come from one run on the exported graph, on the path a
device's smoke test takes::

    prefill(prompt) ─> logits 0 ─> greedy token 0 ─> decode ─> logits 1 ─> token 1 ─> ...

For each position the record keeps the graph's ``TOP_K`` highest logits and their ids.

The tolerance is measured, not guessed. The same sequence is run on the other numeric paths a
serving engine takes, and the largest |Δlogit| over the recorded ids is ``path_logit_diff``:

    whole       one prefill of prompt + tokens (matrix products with M = n rows, not M = 1)
    split       the prompt's head, then its last token alone (what a prefix-cache hit runs)
    halves      the prompt in two prefills (a cache hit on a shorter head; chunked prefill)

Quantized kernels take another path at M = 1 than at M = n (int4 MatMulNBits differs by ~0.1 at
GLM-Edge-1.5B), and another CPU (AVX2, AVX-512, NEON) does the same, so a box may differ from the
export by about that much while computing the same model correctly:
``logit_tolerance = max(TOLERANCE_FACTOR x path_logit_diff, TOLERANCE_FLOOR x logit scale)``.
The floor keeps an fp32 export (path differences near 1e-6) from a tolerance below the rounding
of another machine's kernels. A profile that runs on a GPU (CUDA, TensorRT: fp16 kernels the
export, on ONNX Runtime's CPU provider, cannot run) gets ``GPU_TOLERANCE_FLOOR`` instead. A broken
model misses either by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from export.ort_runner import OrtDecoder

__all__ = ["GPU_TOLERANCE_FLOOR", "TOLERANCE_FACTOR", "TOLERANCE_FLOOR", "TOP_K", "golden_smoke_test"]

TOP_K = 8
TOLERANCE_FACTOR = 4.0
TOLERANCE_FLOOR = 2e-3  # of the largest |logit| on the golden path
GPU_TOLERANCE_FLOOR = 1e-2  # the same, for a box on fp16 GPU kernels


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def _greedy(decoder: OrtDecoder, prompt: list[int], n: int, stop: set[int]) -> np.ndarray:
    """The golden path: logits [positions, vocab]; its argmaxes are the expected tokens."""
    logits, past = decoder.step(np.array([prompt], np.int64), decoder.empty_past(1), len(prompt))
    rows = [logits[0, -1]]
    total = len(prompt)
    while len(rows) < n and int(rows[-1].argmax()) not in stop:
        total += 1
        logits, past = decoder.step(np.array([[int(rows[-1].argmax())]], np.int64), past, total)
        rows.append(logits[0, -1])
    return np.stack(rows).astype(np.float32)


def _forced(decoder: OrtDecoder, parts: Sequence[list[int]], tokens: list[int]) -> np.ndarray:
    """Logits at the positions of ``tokens`` with the prompt run as ``parts`` (one prefill each)."""
    past, total, rows = decoder.empty_past(1), 0, []
    for part in parts:
        total += len(part)
        logits, past = decoder.step(np.array([part], np.int64), past, total)
    rows.append(logits[0, -1])
    for tok in tokens[:-1]:
        total += 1
        logits, past = decoder.step(np.array([[tok]], np.int64), past, total)
        rows.append(logits[0, -1])
    return np.stack(rows).astype(np.float32)


def _paths(decoder: OrtDecoder, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """The golden positions' logits on every other path (see the module docstring)."""
    n = len(prompt)
    whole = decoder.logits(np.array([prompt + tokens[:-1]], np.int64))[0, n - 1 :]
    out = [whole.astype(np.float32)]
    if n >= 2:
        out.append(_forced(decoder, [prompt[:-1], prompt[-1:]], tokens))
    if n >= 4:
        out.append(_forced(decoder, [prompt[: n // 2], prompt[n // 2 :]], tokens))
    return out


def golden_smoke_test(
    decoder: OrtDecoder,
    prompt: str,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop: set[int],
    floor: float = TOLERANCE_FLOOR,
) -> dict[str, Any]:
    """The manifest's ``smoke_test`` section for ``prompt`` on the exported graph ``decoder``."""
    golden = _greedy(decoder, prompt_ids, max_new_tokens, stop)
    tokens = [int(t) for t in golden.argmax(-1)]
    top = np.argsort(-golden, axis=-1, kind="stable")[:, :TOP_K]
    picked = np.take_along_axis(golden, top, axis=-1)
    diff = 0.0
    for other in _paths(decoder, prompt_ids, tokens):
        diff = max(diff, float(np.abs(np.take_along_axis(other, top, axis=-1) - picked).max()))
    scale = float(np.abs(picked).max())
    tolerance = max(TOLERANCE_FACTOR * diff, floor * max(scale, 1.0))
    return {
        "prompt": prompt,
        "prompt_tokens": list(prompt_ids),
        "expected_tokens": tokens,
        "max_new_tokens": max_new_tokens,
        "stop_tokens": sorted(stop),
        "reference": [
            {"ids": [int(i) for i in ids], "logits": [_sig(float(x)) for x in row]}
            for ids, row in zip(top, picked, strict=True)
        ],
        "logit_tolerance": _sig(tolerance, 3),
        "path_logit_diff": _sig(diff, 3),
    }
