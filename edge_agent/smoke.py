"""The on-device smoke test: is the model this box just loaded the one its export validated?

The manifest's smoke-test section (``edgeglm.bundle.SmokeTest``) holds a golden prompt and the
export's greedy tokens for it; bundles from this release on also hold, for each of those
positions, the exported graph's top logits there and a logit tolerance the export measured.

The box runs the golden prompt *teacher-forced*: it prefills the prompt (whole, with the prefix
cache bypassed both ways, as the exporter did) and then feeds the expected tokens one by one,
whatever it would have picked itself, reading its own next-token logits at every position. So a
near-tie that one numeric path breaks one way and another path the other way costs that one
position, never the rest of the sequence, as a free-running greedy comparison did.

A position *passes* when

- ``logits`` rule (the manifest has reference logits): every reference id's logit is within
  ``logit_tolerance`` of the export's, and the box's own top token is the golden one or one the
  export ranked within ``2 x logit_tolerance`` of it (a near-tie the tolerance allows to flip);
- ``tokens`` rule (an older bundle, without them): the box's top token is the golden one.

``agreement`` is the share of positions that pass; the profile's ``smoke_min_agreement`` is the
least a box accepts, and it is what the heartbeat's ``smoke_agreement`` reports (the hub's
``smoke_agreement>=X`` gate reads it). A broken model fails nearly every position (its logits
move by whole units); a benign numeric path passes all of them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from edge_agent.inference.generation import GenerationResult, Prompt
from edge_agent.inference.sampling import SamplingParams
from edgeglm.bundle import SmokePosition, SmokeTest
from edgeglm.errors import UpdateError

if TYPE_CHECKING:
    from edge_agent.inference.engine import Engine
    from edge_agent.inference.scheduler import Scheduler

__all__ = ["SmokeResult", "judge_position", "smoke_test"]

Rule = Literal["logits", "tokens"]


@dataclass(frozen=True)
class SmokeResult:
    agreement: float  # share of golden positions that pass
    tokens: tuple[int, ...]  # the box's own top token at each position it reached
    seconds: float
    rule: Rule = "tokens"
    failed: tuple[int, ...] = ()  # positions that did not pass
    max_abs_logit_diff: float | None = None  # over the reference ids of every position (logits rule)
    tolerance: float | None = None

    def describe(self) -> str:
        """One line for the log and for an error: what passed, and the worst difference."""
        text = f"{self.agreement:.0%} of golden positions pass ({self.rule} rule)"
        if self.max_abs_logit_diff is not None:
            text += f", max |Δlogit| {self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:.3g})"
        if self.failed:
            text += f", first failing position {self.failed[0]}"
        return text


def judge_position(
    logits: np.ndarray, expected: int, ref: SmokePosition | None, tolerance: float | None
) -> tuple[bool, float | None]:
    """Does one position pass (see the module docstring)? Also its max |Δlogit| over ``ref``'s ids."""
    top = int(np.argmax(logits))
    if ref is None or tolerance is None:
        return top == expected, None
    ids = np.asarray(ref.ids, np.int64)
    if int(ids.max()) >= logits.shape[-1]:
        return False, float("inf")  # another vocabulary: not the model the export validated
    delta = float(np.abs(logits[ids].astype(np.float64) - np.asarray(ref.logits)).max())
    if not np.isfinite(delta):
        return False, float("inf")
    if top == expected:
        return delta <= tolerance, delta
    # The export's logit for the box's top token: exact when it is among the reference ids, at
    # most the lowest of them otherwise.
    ranked = dict(zip(ref.ids, ref.logits, strict=True))
    ref_of_top = ranked.get(top, ref.logits[-1])
    return delta <= tolerance and ref.logits[0] - ref_of_top <= 2 * tolerance, delta


class _Judge:
    """Sees the logits of each teacher-forced step (the ``observe`` hook) and scores them."""

    def __init__(self, smoke: SmokeTest) -> None:
        self.smoke = smoke
        self.rule: Rule = "logits" if smoke.reference else "tokens"
        self.passed: list[bool] = []
        self.tops: list[int] = []
        self.worst = 0.0

    def __call__(self, logits: np.ndarray) -> None:
        i = len(self.passed)
        if i >= len(self.smoke.expected_tokens):
            return
        ref = self.smoke.reference[i] if self.smoke.reference else None
        ok, delta = judge_position(logits, self.smoke.expected_tokens[i], ref, self.smoke.logit_tolerance)
        self.passed.append(ok)
        self.tops.append(int(np.argmax(logits)))
        if delta is not None:
            self.worst = max(self.worst, delta)

    def result(self, seconds: float) -> SmokeResult:
        n = len(self.smoke.expected_tokens)
        passed = self.passed + [False] * (n - len(self.passed))  # positions never reached fail
        return SmokeResult(
            agreement=sum(passed) / n if n else 1.0,
            tokens=tuple(self.tops),
            seconds=seconds,
            rule=self.rule,
            failed=tuple(i for i, ok in enumerate(passed) if not ok),
            max_abs_logit_diff=self.worst if self.rule == "logits" else None,
            tolerance=self.smoke.logit_tolerance,
        )


def _golden(engine: Engine) -> tuple[SmokeTest, tuple[int, ...]]:
    """The manifest's smoke test and its prompt as this box's tokenizer encodes it."""
    smoke = engine.manifest.smoke_test
    if smoke is None:
        raise UpdateError(f"bundle {engine.model}@{engine.version}", "has no smoke test in its manifest")
    ids = tuple(engine.codec.encode(smoke.prompt))
    if smoke.prompt_tokens and ids != tuple(smoke.prompt_tokens):
        raise UpdateError("smoke test", "the tokenizer on this box encodes the golden prompt differently")
    return smoke, ids


def smoke_test(engine: Engine, scheduler: Scheduler | None = None, timeout_s: float = 120.0) -> SmokeResult:
    """Run the golden prompt teacher-forced (through ``scheduler`` when the engine is serving)."""
    smoke, ids = _golden(engine)
    judge = _Judge(smoke)
    t0 = time.perf_counter()
    if not smoke.expected_tokens:
        return judge.result(0.0)
    prompt = Prompt(
        ids=ids,
        max_tokens=len(smoke.expected_tokens),
        sampling=SamplingParams(temperature=0.0),
        prefix_cache=False,
        forced=tuple(smoke.expected_tokens),
        observe=judge,
    )
    if scheduler is None:
        result = engine.generate(prompt)
    else:
        done = threading.Event()
        box: list[GenerationResult] = []

        def finished(result: GenerationResult) -> None:
            box.append(result)
            done.set()

        scheduler.submit(prompt, on_done=finished)
        if not done.wait(timeout_s):
            raise UpdateError("smoke test", f"no answer from the engine within {timeout_s:.0f}s")
        result = box[0]
    if result.error_code is not None:
        raise UpdateError("smoke test", f"the engine failed: {result.error_code}: {result.error_message}")
    return judge.result(time.perf_counter() - t0)
