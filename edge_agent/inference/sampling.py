"""Choosing the next token: greedy, temperature, top-k, top-p, penalties, a constraint's mask; seeded.

Order, as in Hugging Face ``generate``: repetition penalty on the raw logits (prompt and answer),
then OpenAI's presence and frequency penalties (the answer's tokens only, as OpenAI defines them:
``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``), then the output
constraint's mask (a token it forbids can never be picked), then temperature, then top-k, then
top-p (nucleus), then one draw from the renormalised distribution. Temperature 0 is greedy and
ignores the other knobs except the penalties and the mask.

The edges (``edgeglm.protocol.InferRequest``) keep the knobs in ranges that cannot overflow float64;
the sampler still guards its scores: NaN is never picked, ``+inf`` tokens are the only candidates
when there are any, and a row with no finite score at all fails its own request
(:class:`RequestError` ``internal``), never the batch it ran in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edgeglm.errors import RequestError

__all__ = ["Sampler", "SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """One per request: its own random generator, so a seed reproduces the same tokens."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))

    def pick(
        self,
        logits: np.ndarray,
        history: Iterable[int] = (),
        *,
        sampled: Sequence[int] = (),
        allowed: np.ndarray | None = None,
    ) -> int:
        """The next token. ``history``: prompt and answer (the repetition penalty's); ``sampled``:
        the answer so far (OpenAI's penalties'); ``allowed``: a constraint's ``bool[vocab]`` mask."""
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is what _guarded handles
            return self._pick(logits, history, sampled, allowed)

    def _pick(
        self, logits: np.ndarray, history: Iterable[int], sampled: Sequence[int], allowed: np.ndarray | None
    ) -> int:
        p = self.params
        scores = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0:
            seen = np.fromiter(set(history), np.int64)
            if seen.size:
                vals = scores[seen]
                scores[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and sampled:
            ids, counts = np.unique(np.asarray(sampled, np.int64), return_counts=True)
            scores[ids] -= counts * p.frequency_penalty + p.presence_penalty
        if allowed is not None:
            scores = np.where(allowed, scores, -np.inf)
        if p.greedy:
            return int(_guarded(scores).argmax())
        scores = _guarded(scores / p.temperature)
        if 0 < p.top_k < scores.size:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores[scores < kth] = -np.inf
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = int(np.searchsorted(cumulative, p.top_p)) + 1  # smallest set with mass >= top_p
            cut = np.zeros_like(probs)
            cut[order[:keep]] = probs[order[:keep]]
            probs = cut / cut.sum()
        return int(self.rng.choice(probs.size, p=probs))


def _guarded(scores: np.ndarray) -> np.ndarray:
    """``scores`` with NaN ruled out and ``+inf`` made the only candidates; refused if none is left."""
    top = scores.max()  # NaN if any is NaN: one pass decides the common case
    if np.isfinite(top):
        return scores
    top_inf = np.isposinf(scores)
    if top_inf.any():  # the softmax limit: all the mass on the +inf tokens, shared equally
        return np.where(top_inf, 0.0, -np.inf)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    if not np.isfinite(scores).any():
        raise RequestError("internal", "the model gave no finite score for any token at this step")
    return scores
