"""The quality gate: the exported graph against the fp32 transformers reference, every export.

For each prompt of the eval set the reference (transformers, fp32) generates a greedy
continuation; on prompt + continuation both models are then compared teacher-forced, and the
export also decodes greedily on its own::

    max_abs_logit_diff         worst |Δlogit| over every position and the vocabulary
    cosine                     mean cosine of the logit vectors (min recorded too)
    top1_agreement             share of positions with the same argmax
    kl                         mean KL(reference ‖ export) of next-token distributions
    greedy_prefix_agreement    mean (common prefix of the two greedy continuations) / length

The profile's thresholds decide; :class:`QualityReport` records metrics, thresholds and failures
for the manifest. Only this module (and the standard route) of the exporter imports torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm.profiles import QualityGate
from export.ort_runner import OrtDecoder

__all__ = ["DEFAULT_PROMPTS", "QualityReport", "Reference", "evaluate", "load_prompts"]

DEFAULT_PROMPTS = Path(__file__).with_name("eval_prompts.json")


def load_prompts(path: Path | None = None) -> list[str]:
    """A JSON list of strings (``--eval-prompts FILE``), or the shipped default set."""
    from edgeglm.errors import ConfigError

    path = path or DEFAULT_PROMPTS
    try:
        prompts = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"eval prompts {path}", f"not a readable JSON file: {exc}") from exc
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError(f"eval prompts {path}", "must be a non-empty JSON list of non-empty strings")
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

    def greedy(self, ids: np.ndarray, n: int) -> np.ndarray:
        with self._torch.no_grad():
            out = self.model.generate(
                self._torch.from_numpy(ids.astype(np.int64)),
                attention_mask=self._torch.ones(ids.shape, dtype=self._torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, ids.shape[1] :].numpy()


def _sig(x: float) -> float:
    """Six significant figures: small differences stay visible in the manifest."""
    return float(f"{x:.6g}")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def evaluate(
    reference: Reference,
    decoder: OrtDecoder,
    prompt_ids: list[list[int]],
    gate: QualityGate,
    new_tokens: int = 32,
) -> QualityReport:
    max_diff, cosines, top1, kls, prefix = 0.0, [], [], [], []
    for ids in prompt_ids:
        prompt = np.array([ids], np.int64)
        ref_cont = reference.greedy(prompt, new_tokens)
        full = np.concatenate([prompt, ref_cont], axis=1)
        ref = reference.logits(full)[0]
        exp = decoder.logits(full)[0]
        max_diff = max(max_diff, float(np.abs(ref - exp).max()))
        num = (ref * exp).sum(-1)
        den = np.linalg.norm(ref, axis=-1) * np.linalg.norm(exp, axis=-1) + 1e-12
        cosines.extend((num / den).tolist())
        top1.extend((ref.argmax(-1) == exp.argmax(-1)).tolist())
        lp, lq = _log_softmax(ref), _log_softmax(exp)
        kls.extend((np.exp(lp) * (lp - lq)).sum(-1).tolist())
        ours = decoder.greedy(prompt, new_tokens)[0]
        same = ours[: len(ref_cont[0])] == ref_cont[0][: len(ours)]
        prefix.append(float(np.argmin(same)) if not same.all() else float(len(same)))
        prefix[-1] /= new_tokens
    report = QualityReport(
        max_abs_logit_diff=_sig(max_diff),
        cosine=_sig(float(np.mean(cosines))),
        cosine_min=_sig(float(np.min(cosines))),
        top1_agreement=_sig(float(np.mean(top1))),
        kl=_sig(float(np.mean(kls))),
        greedy_prefix_agreement=_sig(float(np.mean(prefix))),
        prompts=len(prompt_ids),
        new_tokens=new_tokens,
        thresholds=gate.model_dump(),
    )
    checks = [
        (
            "max_abs_logit_diff",
            report.max_abs_logit_diff <= gate.max_abs_logit_diff,
            "<=",
            gate.max_abs_logit_diff,
        ),
        ("cosine", report.cosine >= gate.min_cosine, ">=", gate.min_cosine),
        ("top1_agreement", report.top1_agreement >= gate.min_top1_agreement, ">=", gate.min_top1_agreement),
        ("kl", report.kl <= gate.max_kl, "<=", gate.max_kl),
        (
            "greedy_prefix_agreement",
            report.greedy_prefix_agreement >= gate.min_greedy_prefix_agreement,
            ">=",
            gate.min_greedy_prefix_agreement,
        ),
    ]
    report.failures = [
        f"{name} {getattr(report, name)} (needs {op} {limit})" for name, ok, op, limit in checks if not ok
    ]
    return report
