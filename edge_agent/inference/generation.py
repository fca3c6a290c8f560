"""One request in flight: its prompt, how to sample, when to stop, what it produced.

``Generation.accept(token)`` is the whole stopping rule, shared by the scheduler and the engine's
direct loop so both produce the same tokens: a stop token ends it (the token is kept in
``tokens``, as the exporter's golden tokens keep it, never in ``text``), a stop string ends it
(text cut before the string), ``max_tokens`` or the context ends it with ``length``. Streamed
text holds back the last characters that could still start a stop string.

A constrained request (``Prompt.grammar``) samples only among the tokens its
:class:`~edge_agent.inference.constraint.Constraint` allows, and ends ``stop`` when the grammar
can take nothing more or the model picks a stop token where the grammar accepts; ``max_tokens``
reached before that (an unfinished JSON value) ends it ``length``, as OpenAI does. A request with
tools (``Prompt.tools``) whose answer ends ``stop`` in the shape of a call ends ``tool_calls``
instead, the call read into ``GenerationResult.tool_calls``.

``Prompt.logprobs`` (0 or more alternatives) records, for every chosen token, its log-probability
under the model's own distribution at that step: the log-softmax of the raw logits, before the
penalties, the constraint's mask, temperature, top-k and top-p (what OpenAI reports: the numbers
do not change with ``temperature``). The stream callback then gets that step's entries too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edge_agent.inference.codec import Codec, Detokenizer
from edge_agent.inference.constraint import Constraint, Grammar
from edge_agent.inference.runtime import Sequence
from edge_agent.inference.sampling import Sampler, SamplingParams
from edge_agent.inference.tools import ToolPlan
from edgeglm.protocol import TokenLogprob, ToolCall, TopLogprob

__all__ = ["Generation", "GenerationResult", "Prompt"]

_FLOOR = -9999.0  # the log-probability reported for a token the model cannot pick (OpenAI's)

FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]


@dataclass(frozen=True)
class Prompt:
    """A validated request, tokenized: what the engine runs."""

    ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stream: bool = False
    deadline: float | None = None  # time.monotonic() after which the request is given up
    prefix_cache: bool = True  # False: prefilled whole, nothing stored (the smoke test's path)
    grammar: Grammar | None = None  # the output constraint (``response_format``, a forced call)
    tools: ToolPlan | None = None  # the request's tools: a "stop" answer may be read as a call
    logprobs: int | None = None  # None: none; k: each chosen token's logprob and its k best rivals
    # Teacher forcing (the smoke test): these tokens are fed instead of sampled ones, and
    # ``observe`` sees the logits of every step, the prompt's last position first.
    forced: tuple[int, ...] = ()
    observe: Callable[[np.ndarray], None] | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, reused from the prefix cache instead of prefilled
    error_code: str | None = None
    error_message: str = ""
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    ttft_ms: float | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCall, ...] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


# ``on_text(text, ids)``; with ``Prompt.logprobs`` set, ``on_text(text, ids, logprobs)``.
OnText = Callable[..., None]
OnDone = Callable[[GenerationResult], None]


@dataclass(eq=False)
class Generation:
    prompt: Prompt
    codec: Codec
    stop_tokens: frozenset[int]
    max_context: int
    on_text: OnText | None = None
    on_done: OnDone | None = None
    created: float = field(default_factory=time.monotonic)
    seq: Sequence | None = None
    tokens: list[int] = field(default_factory=list)
    last: int = -1  # the token to feed next
    started: float | None = None
    first_token: float | None = None
    prefilled: float | None = None
    result: GenerationResult | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.prompt.sampling)
        self.detok = Detokenizer(self.codec)
        self.text = ""
        self._emitted = 0
        self._hold = max((len(s) for s in self.prompt.stop), default=1) - 1
        self._pending_ids: list[int] = []
        self.constraint: Constraint | None = (
            None if self.prompt.grammar is None else self.prompt.grammar.matcher()
        )
        self.logprobs: list[TokenLogprob] | None = None if self.prompt.logprobs is None else []

    # -------------------------------------------------------------------------------- control
    def cancel(self) -> None:
        """Ask for the generation to end; it finishes ``cancelled`` at the next step boundary."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def expired(self, now: float) -> bool:
        return self.prompt.deadline is not None and now > self.prompt.deadline

    @property
    def done(self) -> bool:
        return self.result is not None

    # ------------------------------------------------------------------------------ stepping
    def accept(self, logits_row: object) -> None:
        """Sample from the logits of the last step and apply the stopping rule."""
        now = time.monotonic()
        penalised = self.prompt.sampling.repetition_penalty != 1.0
        history = (*self.prompt.ids, *self.tokens) if penalised else ()
        if self.prompt.observe is not None:
            self.prompt.observe(logits_row)  # type: ignore[arg-type]
        if self.prompt.forced:
            token = self.prompt.forced[len(self.tokens)]
        else:
            allowed = None if self.constraint is None else self.constraint.allowed()
            token = self.sampler.pick(logits_row, history, sampled=self.tokens, allowed=allowed)  # type: ignore[arg-type]
        if self.first_token is None:
            self.first_token = now
        if self.logprobs is not None:
            self.logprobs.append(self._logprob(logits_row, token))  # type: ignore[arg-type]
        self.tokens.append(token)
        self._pending_ids.append(token)
        self.last = token
        if token in self.stop_tokens:
            self.finish("stop")
            return
        if self.constraint is not None:
            self.constraint.advance(token)
        self.text += self.detok.add(token)
        if self._stop_string():
            self.finish("stop")
            return
        if self.constraint is not None and self.constraint.stopped:  # the grammar is complete
            self.text += self.detok.flush()
            self.finish("stop")
            return
        total = len(self.prompt.ids) + len(self.tokens)
        limit = (
            min(len(self.prompt.forced), self.prompt.max_tokens)
            if self.prompt.forced
            else self.prompt.max_tokens
        )
        if len(self.tokens) >= limit or total >= self.max_context:
            self.text += self.detok.flush()
            if self._stop_string():
                self.finish("stop")
            else:
                self.finish("length")
            return
        self._stream(final=False)

    def _logprob(self, logits: np.ndarray, token: int) -> TokenLogprob:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            row = logits.astype(np.float64)
            top = row.max()
            logp = row - (top + np.log(np.exp(row - top).sum()))
        k = self.prompt.logprobs or 0
        best = np.argpartition(-logp, k - 1)[:k] if 0 < k < logp.size else np.arange(logp.size if k else 0)
        best = best[np.lexsort((best, -logp[best]))]  # most likely first; ties by token id
        rivals = tuple(self._entry(int(t), float(logp[t])) for t in best)
        chosen = self._entry(token, float(logp[token]))
        return TokenLogprob(token=token, text=chosen.text, logprob=chosen.logprob, top=rivals)

    def _entry(self, token: int, logprob: float) -> TopLogprob:
        value = logprob if np.isfinite(logprob) and logprob > _FLOOR else _FLOOR
        return TopLogprob(token=token, text=self.codec.decode([token]), logprob=min(0.0, value))

    def _stop_string(self) -> bool:
        if not self.prompt.stop:
            return False
        start = max(0, self._emitted - self._hold)
        hits = [i for s in self.prompt.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def _stream(self, *, final: bool) -> None:
        if not self.prompt.stream or self.on_text is None:
            return
        upto = len(self.text) if final else max(self._emitted, len(self.text) - self._hold)
        piece = self.text[self._emitted : upto]
        if piece or self._pending_ids:
            if self.logprobs is None:
                self.on_text(piece, self._pending_ids)
            else:
                self.on_text(
                    piece, self._pending_ids, self.logprobs[len(self.logprobs) - len(self._pending_ids) :]
                )
            self._emitted = upto
            self._pending_ids = []

    def finish(self, reason: FinishReason, code: str | None = None, message: str = "") -> None:
        if self.result is not None:
            return
        now = time.monotonic()
        if reason != "error":
            self._stream(final=True)
        calls = self.prompt.tools.read(self.text) if self.prompt.tools and reason == "stop" else None
        if calls:
            reason = "tool_calls"
        started = self.started or now
        prefilled = self.prefilled or now
        ms = 1000.0
        self.result = GenerationResult(
            text=self.text,
            tokens=tuple(self.tokens),
            finish_reason=reason,
            prompt_tokens=len(self.prompt.ids),
            cached_tokens=self.seq.cached if self.seq is not None else 0,
            error_code=code,
            error_message=message,
            queue_ms=(started - self.created) * ms,
            prefill_ms=max(0.0, prefilled - started) * ms if self.prefilled else 0.0,
            decode_ms=max(0.0, now - prefilled) * ms if self.prefilled else 0.0,
            total_ms=(now - self.created) * ms,
            ttft_ms=(self.first_token - self.created) * ms if self.first_token else None,
            logprobs=None if self.logprobs is None else tuple(self.logprobs),
            tool_calls=calls,
        )
        if self.on_done is not None:
            self.on_done(self.result)
