"""Engine-state harness: request mixes on long-lived engines, each answer checked against a fresh one.

State an engine carries between requests is where leaks hide: KV arena rows that requests share in
turn, rows moved down by compaction, prefix-cache entries, the spare row of direct calls, an
engine retired as a standby and later served again. A mix is a list of operations::

    ("ask", prompt, forced, direct)   a request through the serving scheduler, or (direct) on the
                                      spare row from this thread while the scheduler runs
    ("wait",)                         let every pending request finish (a batch drains)
    ("serve", name)                   retire the serving engine (its scheduler stops), serve ``name``

Every request is teacher-forced (``Prompt.forced``): its tokens are fixed, so its logits can be
compared position by position, whatever ran beside it. :func:`check` recomputes each request on a
*fresh* engine of the same bundle (prefix cache off) on the same numeric path: the prompt split
where the request's prefix-cache hit split it, then one token per step. What a correct engine may
still differ by is the kernels' own difference between a row decoded alone and one decoded in a
batch (M = 1 against M = n in MatMulNBits); :func:`measure_tolerance` measures it on the bundle.

That measurement bounds the difference only where a row's result moves continuously with its
input, so the harness runs on a bundle whose MatMulNBits compute in fp32 (``accuracy_level`` 0).
On the int8-compute path the profiles ship (``accuracy_level`` 4) each row's activations are
rounded to int8 first: the ~1e-6 that M = 1 and M = n differ by upstream (attention, norms) now
and then moves one activation across a rounding boundary, a whole int8 step. Measured on the tiny
int4 bundle at block 128: a layer-1 gate_up input 1e-6 apart gave outputs 0.0036 apart and logits
0.036 apart, 6000x the largest difference four sampled requests showed. The code under test (rows,
compaction, the prefix cache, standbys) is the same at every accuracy level.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOLERANCE_FACTOR = 4.0  # over the largest kernel difference measured
TOLERANCE_FLOOR = 1e-4  # of the largest |logit|: paths that measure exactly equal still round


@dataclass(frozen=True)
class Ask:
    ids: tuple[int, ...]
    forced: tuple[int, ...]
    direct: bool = False


@dataclass
class Observed:
    engine: str
    ask: Ask
    logits: list[np.ndarray] = field(default_factory=list)
    cached: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def observe(self, row: np.ndarray) -> None:
        self.logits.append(np.array(row, np.float32, copy=True))


def _prompt(ask: Ask, seen: Observed) -> Any:
    from edge_agent.inference.generation import Prompt

    return Prompt(ids=ask.ids, max_tokens=len(ask.forced), forced=ask.forced, observe=seen.observe)


class EngineWorld:
    """Loaded engines by name; one serves at a time through its own scheduler."""

    def __init__(self, engines: dict[str, Any]) -> None:
        self.engines = engines
        self.serving: str | None = None
        self.scheduler: Any = None
        self.observed: list[Observed] = []

    def serve(self, name: str) -> None:
        from edge_agent.inference.scheduler import Scheduler

        self.wait()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.serving = name
        self.scheduler = Scheduler(self.engines[name], queue_size=256).start()

    def ask(self, ask: Ask) -> None:
        assert self.serving is not None
        seen = Observed(self.serving, ask)
        self.observed.append(seen)
        engine = self.engines[self.serving]
        if ask.direct:
            result = engine.generate(_prompt(ask, seen))
            self._finish(seen, result)
            return
        self.scheduler.submit(_prompt(ask, seen), on_done=lambda result: self._finish(seen, result))

    @staticmethod
    def _finish(seen: Observed, result: Any) -> None:
        seen.cached = result.cached_tokens
        seen.error = result.error_code
        seen.done.set()

    def wait(self, timeout: float = 60.0) -> None:
        for seen in self.observed:
            assert seen.done.wait(timeout), f"a request of {seen.engine} never finished"

    def run(self, ops: Sequence[tuple[Any, ...]]) -> list[Observed]:
        start = len(self.observed)
        for op in ops:
            if op[0] == "ask":
                self.ask(op[1])
            elif op[0] == "wait":
                self.wait()
            elif op[0] == "serve":
                self.serve(op[1])
            else:
                raise ValueError(f"unknown operation {op!r}")
        self.wait()
        return self.observed[start:]

    def close(self) -> None:
        self.wait()
        if self.scheduler is not None:
            self.scheduler.stop()


def reference_logits(engine: Any, ids: Sequence[int], forced: Sequence[int], cached: int = 0) -> np.ndarray:
    """``forced``'s positions on a fresh ``engine`` alone: prompt split at ``cached``, one token a step."""
    graph = engine.graph
    seq = graph.open()
    try:
        if cached:
            graph.prefill(seq, ids[:cached], cache=False)
        rows = [graph.prefill(seq, ids[cached:], cache=False)]
        for tok in forced[:-1]:
            rows.append(graph.decode([seq], [tok])[0])
    finally:
        graph.close(seq)
    return np.stack(rows)


def _batched(engine: Any, asks: Sequence[Ask]) -> list[np.ndarray]:
    graph = engine.graph
    seqs = [graph.open() for _ in asks]
    try:
        rows = [[graph.prefill(s, a.ids, cache=False)] for s, a in zip(seqs, asks, strict=True)]
        for step in range(max(len(a.forced) for a in asks) - 1):
            live = [i for i, a in enumerate(asks) if step < len(a.forced) - 1]
            out = graph.decode([seqs[i] for i in live], [asks[i].forced[step] for i in live])
            for i, row in zip(live, out, strict=True):
                rows[i].append(row)
    finally:
        for s in seqs:
            graph.close(s)
    return [np.stack(r) for r in rows]


def measure_tolerance(engine: Any, asks: Sequence[Ask]) -> tuple[float, dict[str, float]]:
    """The kernels' difference on this bundle (alone vs batched; whole vs split prompt), and the
    tolerance :func:`check` allows: ``TOLERANCE_FACTOR`` x the largest, at least the floor."""
    alone = [reference_logits(engine, a.ids, a.forced) for a in asks]
    batched = _batched(engine, asks)
    split = [reference_logits(engine, a.ids, a.forced, cached=len(a.ids) - 1) for a in asks]
    diffs = {
        "batched": max(float(np.abs(x - y).max()) for x, y in zip(alone, batched, strict=True)),
        "split": max(float(np.abs(x - y).max()) for x, y in zip(alone, split, strict=True)),
    }
    scale = max(float(np.abs(x).max()) for x in alone)
    return max(TOLERANCE_FACTOR * max(diffs.values()), TOLERANCE_FLOOR * scale), diffs


def check(observed: Sequence[Observed], fresh: dict[str, Any], tolerance: float) -> float:
    """Every request's logits against a fresh engine's on its path; the worst |Δlogit| seen."""
    worst = 0.0
    for seen in observed:
        assert seen.error is None, f"a request failed: {seen.error}"
        assert len(seen.logits) == len(seen.ask.forced), "a request stopped early"
        ref = reference_logits(fresh[seen.engine], seen.ask.ids, seen.ask.forced, seen.cached)
        diff = float(np.abs(np.stack(seen.logits) - ref).max())
        worst = max(worst, diff)
        assert diff <= tolerance, (
            f"{seen.engine}: a request ({len(seen.ask.ids)} prompt tokens, {seen.cached} from the "
            f"prefix cache, {'direct' if seen.ask.direct else 'scheduled'}) differs from a fresh "
            f"engine by {diff:.4g} > tolerance {tolerance:.4g}"
        )
    return worst
