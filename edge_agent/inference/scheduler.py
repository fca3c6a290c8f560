"""Batches concurrent requests onto one engine: a bounded queue and one decode loop thread.

    submit() ──> waiting (bounded; full: RequestError busy, at once) ──> admit ──> running ──> done
                                                                         prefill    decode step
                                                                                   (all rows at once)

Each turn of the loop: give up queued requests that were cancelled or whose deadline passed;
admit waiting requests while fewer than ``max_batch_size`` run (prefill, first token); then one
decode step for every running request together. A graph that can take new rows mid-batch (the
fused graph: continuous batching) admits at every step boundary; one that cannot (the standard
graph) admits only when the batch has drained. When the loop is idle it waits ``batch_wait_ms``
after the first arrival so that requests arriving together start together.

Constrained requests (``response_format``) need their token masks before they sample: the
:class:`~edge_agent.inference.constraint.MaskPool` computes them on llguidance's threads, started
just before the step's prefill or decode and collected after it, so they overlap the model's run.
A step with no constrained row does none of this.

Callbacks (``on_text``, ``on_done``) run on the loop thread and must not block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from edge_agent.inference.constraint import MaskPool
from edge_agent.inference.engine import Engine
from edge_agent.inference.generation import Generation, OnDone, OnText, Prompt
from edgeglm.errors import RequestError

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)


class _Metrics(Protocol):
    """What the scheduler reports (``edge_agent.metrics.Metrics`` fits)."""

    def observe_batch(self, size: int) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


class _NoMetrics:
    def observe_batch(self, size: int) -> None:
        pass

    def set_queue_depth(self, depth: int) -> None:
        pass


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int | None = None,
        batch_wait_ms: int | None = None,
        queue_size: int | None = None,
        metrics: _Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = min(max_batch_size or engine.limits.max_batch_size, engine.limits.max_batch_size)
        wait = engine.limits.batch_wait_ms if batch_wait_ms is None else batch_wait_ms
        self.batch_wait_s = wait / 1000
        self.queue_size = queue_size if queue_size is not None else max(8, 4 * self.max_batch)
        self.metrics: _Metrics = metrics or _NoMetrics()
        self._waiting: deque[Generation] = deque()
        self._running: list[Generation] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._masks: MaskPool | None = None  # made when the first constrained request runs
        self.steps = 0

    # ------------------------------------------------------------------------------- public
    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="edge-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish running requests as ``cancelled``, refuse new ones, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._masks is not None:
            self._masks.close()

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        """The scheduler thread runs (a bug that escaped its loop would end it)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(
        self, prompt: Prompt, on_text: OnText | None = None, on_done: OnDone | None = None
    ) -> Generation:
        """Queue ``prompt``; raises :class:`RequestError` ``busy`` at once when the queue is full."""
        gen = self.engine.start(prompt, on_text, on_done)
        with self._cond:
            if self._stopping:
                raise RequestError("unavailable", "the agent is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise RequestError(
                    "busy",
                    f"{len(self._waiting)} requests are queued already; retry later",
                    hint="Back off and retry; the agent sheds load instead of queueing without bound.",
                )
            self._waiting.append(gen)
            self.metrics.set_queue_depth(len(self._waiting))
            self._cond.notify_all()
        return gen

    # --------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                if not self._running and self.batch_wait_s:
                    until = self._waiting[0].created + self.batch_wait_s
                    while len(self._waiting) < self.max_batch and (left := until - time.monotonic()) > 0:
                        self._cond.wait(left)
                admitted = self._take_admissible()
                self.metrics.set_queue_depth(len(self._waiting))
            try:
                self._turn(admitted)
            except Exception:  # a bug must not stop serving: fail the requests involved, carry on
                log.exception("scheduler step failed")
                for gen in dict.fromkeys([*admitted, *self._running]):
                    self._fail(gen, "internal", "the engine failed on this request; see the agent log")
                self._running = [g for g in self._running if not g.done]
        self._shutdown()

    def _take_admissible(self) -> list[Generation]:
        now = time.monotonic()
        for gen in [g for g in self._waiting if g.cancelled or g.expired(now)]:
            self._waiting.remove(gen)
            self._give_up(gen)
        if self._running and not self.engine.graph.joins_running:
            return []
        room = self.max_batch - len(self._running)
        return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]

    def _masks_for(self, gens: list[Generation]) -> Callable[[], None]:
        """Start the masks of the constrained ones of ``gens``; the result waits for them."""
        constraints = [g.constraint for g in gens if g.constraint is not None]
        if not constraints:
            return _nothing
        if self._masks is None:
            self._masks = MaskPool()
        return self._masks.start(constraints).wait

    def _turn(self, admitted: list[Generation]) -> None:
        graph = self.engine.graph
        masks = self._masks_for(admitted)
        try:
            for gen in admitted:
                gen.started = time.monotonic()
                gen.seq = graph.open()
                self._running.append(gen)
                self._alone(gen, lambda g=gen: self._prefill(g, masks))
        finally:  # collected even if every prefill (or open) failed: no matcher is used by two threads
            masks()
        now = time.monotonic()
        for gen in self._running:
            if not gen.done and (gen.cancelled or gen.expired(now)):
                self._give_up(gen)
        live = [g for g in self._running if not g.done]
        if live:
            masks = self._masks_for(live)
            try:
                logits = graph.decode([g.seq for g in live], [g.last for g in live])  # type: ignore[misc]
            finally:
                masks()
            self.steps += 1
            self.metrics.observe_batch(len(live))
            for gen, row in zip(live, logits, strict=True):
                self._alone(gen, lambda g=gen, r=row: g.accept(r))
        for gen in [g for g in self._running if g.done]:
            self._running.remove(gen)
            if gen.seq is not None:
                graph.close(gen.seq)

    def _prefill(self, gen: Generation, masks: Callable[[], None]) -> None:
        seq = gen.seq
        assert seq is not None
        logits = self.engine.graph.prefill(seq, gen.prompt.ids, cache=gen.prompt.prefix_cache)
        masks()  # the first admitted row waits for the masks of all; they ran during its prefill
        gen.accept(logits)
        gen.prefilled = time.monotonic()

    def _alone(self, gen: Generation, step: Callable[[], None]) -> None:
        """Run one request's own part of a step (its prefill, its sampling); a failure there ends
        that request alone, never the others in its batch."""
        try:
            step()
        except RequestError as exc:
            gen.finish("error", exc.code, exc.why)
        except Exception:  # a bug in one request's step: that request fails, serving goes on
            log.exception("a request failed in its own step")
            gen.finish("error", "internal", "the engine failed on this request; see the agent log")

    def _give_up(self, gen: Generation) -> None:
        if gen.cancelled:
            gen.finish("cancelled")
        else:
            gen.finish("error", "timeout", "the request's deadline passed before it finished")

    def _fail(self, gen: Generation, code: str, message: str) -> None:
        if not gen.done:
            gen.finish("error", code, message)
        if gen.seq is not None:
            self.engine.graph.close(gen.seq)

    def _shutdown(self) -> None:
        with self._cond:
            pending = [*self._waiting, *self._running]
            self._waiting.clear()
        for gen in pending:
            if not gen.done:
                gen.finish("error", "unavailable", "the agent is shutting down")
            if gen.seq is not None:
                self.engine.graph.close(gen.seq)
        self._running = []


def _nothing() -> None:
    pass
