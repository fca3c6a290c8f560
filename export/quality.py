"""The quality gate: the exported graph against the fp32 transformers reference, every export.

For each prompt of the eval set the reference (transformers, fp32) generates a greedy
continuation; on prompt + continuation both models are then compared teacher-forced, and the
export also decodes greedily on its own::

    max_abs_logit_diff         worst |Δlogit| over every position and the vocabulary
    cosine                     mean cosine of the logit vectors (min recorded too)
    top1_agreement             share of positions with the same argmax
    kl                         mean KL(reference ‖ export) of next-token distributions
    greedy_prefix_agreement    mean (common prefix of the two greedy continuations) / reference
                               length; both run up to ``new_tokens`` or a stop token, as a device does

A TensorRT engine, where the profile builds one, is held to the same thresholds on the same
sequences (teacher-forced metrics; the greedy loop runs on the ONNX graph).

The profile's thresholds decide; :class:`QualityReport` records metrics, thresholds and failures
for the manifest. Only this module (and the standard route) of the exporter imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm.profiles import QualityGate
from export.ort_runner import OrtDecoder

__all__ = ["DEFAULT_PROMPTS", "QualityReport", "Reference", "evaluate", "load_prompts"]

DEFAULT_PROMPTS = Path(__file__).with_name("eval_prompts.json")


def load_prompts(path: Path | None = None, what: str = "eval prompts", raw: bytes | None = None) -> list[str]:
    """A JSON list of strings (``--eval-prompts FILE``, ``--calibration FILE``), or the shipped set;
    ``raw``: the file's bytes, already read (the caller hashes what it parsed)."""
    from edgeglm.errors import ConfigError

    path = path or DEFAULT_PROMPTS
    try:
        prompts = json.loads(Path(path).read_bytes() if raw is None else raw)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}", f"not a readable JSON file: {exc}") from exc
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError(f"{what} {path}", "must be a non-empty JSON list of non-empty strings")
    return prompts


@dataclass
class QualityReport:
    max_abs_logit_diff: float
    cosine: float
    cosine_min: float
    top1_agreement: float
    kl: float
    greedy_prefix_agreement: float
    prompts: int
    new_tokens: int
    thresholds: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    engine: dict[str, float] | None = None  # TensorRT engine, teacher-forced, where one was built

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class Reference:
    """The fp32 transformers model of a checkpoint; loaded once, used for the gate and smoke test."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            out = self.model(self._torch.from_numpy(ids.astype(np.int64)), use_cache=False)
        return out.logits.float().numpy()

    def greedy(self, ids: np.ndarray, n: int, stop: frozenset[int] = frozenset()) -> list[int]:
        """Up to ``n`` greedy tokens after ``ids`` [1, seq], KV-cached; ends after a stop token.

        A plain argmax loop on purpose: ``generate()`` would add its own logits processors
        (``min_new_tokens`` suppresses the stop tokens, for one) and then the export is compared
        with something no device ever runs.
        """
        torch = self._torch
        out: list[int] = []
        with torch.no_grad():
            res = self.model(torch.from_numpy(ids.astype(np.int64)), use_cache=True)
            for _ in range(n):
                nxt = int(res.logits[0, -1].argmax())
                out.append(nxt)
                if nxt in stop:
                    break
                res = self.model(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
        return out


def _sig(x: float) -> float:
    """Six significant figures: small differences stay visible in the manifest."""
    return float(f"{x:.6g}")


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix; sequences of different lengths differ where the shorter ends."""
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if differs.size else n


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class _TeacherForced:
    """Running logit comparisons of one candidate against the reference, position by position."""

    def __init__(self) -> None:
        self.max_diff = 0.0
        self.cosines: list[float] = []
        self.top1: list[bool] = []
        self.kls: list[float] = []

    def add(self, ref: np.ndarray, exp: np.ndarray) -> None:
        self.max_diff = max(self.max_diff, float(np.abs(ref - exp).max()))
        num = (ref * exp).sum(-1)
        den = np.linalg.norm(ref, axis=-1) * np.linalg.norm(exp, axis=-1) + 1e-12
        self.cosines.extend((num / den).tolist())
        self.top1.extend((ref.argmax(-1) == exp.argmax(-1)).tolist())
        lp, lq = _log_softmax(ref), _log_softmax(exp)
        self.kls.extend((np.exp(lp) * (lp - lq)).sum(-1).tolist())

    def metrics(self) -> dict[str, float]:
        return {
            "max_abs_logit_diff": _sig(self.max_diff),
            "cosine": _sig(float(np.mean(self.cosines))),
            "cosine_min": _sig(float(np.min(self.cosines))),
            "top1_agreement": _sig(float(np.mean(self.top1))),
            "kl": _sig(float(np.mean(self.kls))),
        }


def _failures(metrics: dict[str, float], gate: QualityGate, prefix: str = "") -> list[str]:
    """One line per metric present in ``metrics`` that misses the gate's threshold."""
    limits = {
        "max_abs_logit_diff": ("<=", gate.max_abs_logit_diff),
        "cosine": (">=", gate.min_cosine),
        "top1_agreement": (">=", gate.min_top1_agreement),
        "kl": ("<=", gate.max_kl),
        "greedy_prefix_agreement": (">=", gate.min_greedy_prefix_agreement),
    }
    out = []
    for name, (op, limit) in limits.items():
        if name in metrics and not (metrics[name] <= limit if op == "<=" else metrics[name] >= limit):
            out.append(f"{prefix}{name} {metrics[name]} (needs {op} {limit})")
    return out


Logits = Callable[[np.ndarray], np.ndarray]


def evaluate(
    reference: Reference,
    decoder: OrtDecoder,
    prompt_ids: list[list[int]],
    gate: QualityGate,
    new_tokens: int = 32,
    stop_tokens: frozenset[int] = frozenset(),
    engine: Logits | None = None,
) -> QualityReport:
    """Compare ``decoder`` with ``reference`` on every prompt; greedy runs end at ``stop_tokens``.

    ``engine`` (a TensorRT engine's teacher-forced logits) is compared on the same sequences and
    gated by the same thresholds; its metrics land in ``report.engine``.
    """
    graph, built, prefix = _TeacherForced(), _TeacherForced(), []
    for ids in prompt_ids:
        prompt = np.array([ids], np.int64)
        ref_cont = np.array(reference.greedy(prompt, new_tokens, stop_tokens), np.int64)
        full = np.concatenate([prompt, ref_cont[None]], axis=1)
        ref = reference.logits(full)[0]
        graph.add(ref, decoder.logits(full)[0])
        if engine is not None:
            built.add(ref, engine(full)[0])
        ours = decoder.greedy(prompt, new_tokens, set(stop_tokens))[0]
        prefix.append(_common_prefix(ours, ref_cont) / len(ref_cont))
    metrics = {**graph.metrics(), "greedy_prefix_agreement": _sig(float(np.mean(prefix)))}
    report = QualityReport(
        max_abs_logit_diff=metrics["max_abs_logit_diff"],
        cosine=metrics["cosine"],
        cosine_min=metrics["cosine_min"],
        top1_agreement=metrics["top1_agreement"],
        kl=metrics["kl"],
        greedy_prefix_agreement=metrics["greedy_prefix_agreement"],
        prompts=len(prompt_ids),
        new_tokens=new_tokens,
        thresholds=gate.model_dump(),
        failures=_failures(metrics, gate),
    )
    if engine is not None:
        report.engine = built.metrics()
        report.failures += _failures(report.engine, gate, prefix="engine ")
    return report
