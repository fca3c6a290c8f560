"""Constrained decoding: a request's ``response_format`` as a mask of the tokens it may pick next.

The one module that imports llguidance (the library ONNX Runtime GenAI and llama.cpp use). The
scheduler sees three things: a :class:`Constraint` per constrained request, its boolean mask of
allowed tokens for the next step, and :meth:`Constraint.advance` with the token it chose.

    Constraints(folder, vocab, eos)        one per engine: llguidance's tokenizer, built lazily
      .compile(ResponseFormat) -> Grammar  checked against that tokenizer; a schema, regex or
                                           grammar that does not compile is RequestError
                                           ``bad_request`` naming ``response_format``;
                                           the last 64 checked grammars are kept, so a
                                           schema asked for again is not checked again
    Grammar.matcher() -> Constraint        one per request: the parser state (built on the
                                           submitting thread, never the decode loop)
    MaskPool.start(constraints)            the masks of every constrained row of a step, computed
      -> pending; pending.wait()           by llguidance's own threads without the GIL, started
                                           before the decode step and collected after it, so
                                           they cost the batch nothing while the model runs
    Constraint.allowed() -> bool[vocab]    the mask (computed here if no pool computed it)
    Constraint.advance(token)              consume the chosen token; ``stopped`` once the grammar
                                           can take nothing more (the answer is complete)

Rows without a constraint are never touched. The tokenizer is built from the bundle's own
``tokenizer.json`` with the ``tokenizers`` library llguidance links, so the agent needs neither
torch nor transformers. The stop tokens are llguidance's EOS: they are allowed exactly when the
grammar accepts, so a constrained answer ends when the grammar is satisfied and the model picks a
stop token, or when the grammar allows nothing more.

JSON is compiled compact (no whitespace between tokens) unless the schema's ``x-guidance`` says
otherwise: a small model given free whitespace can spend its whole budget on newlines.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import llguidance
import numpy as np

from edgeglm.errors import RequestError
from edgeglm.protocol.inference import ResponseFormat

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["Constraint", "Constraints", "Grammar", "MaskPool"]

_JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}
_CHECKED_KEPT = 64  # checked grammars kept per engine (each is its source text, kilobytes)
_ANY_OBJECT = {"type": "object"}


class Grammar:
    """A compiled, checked grammar for one tokenizer; :meth:`matcher` starts a request on it."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, source: str, vocab: int) -> None:
        self._tokenizer, self.source, self.vocab = tokenizer, source, vocab

    def matcher(self) -> Constraint:
        matcher = llguidance.LLMatcher(self._tokenizer, self.source, log_level=0)
        return Constraint(matcher, self.vocab, (self._tokenizer.vocab_size + 31) // 32)


class Constraint:
    """One request's parser state and its mask for the next token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int, words: int) -> None:
        self._matcher, self.vocab, self.words = matcher, vocab, words  # vocab: the logits' width
        self._mask: np.ndarray | None = None

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RequestError("internal", f"the output constraint failed: {self._matcher.get_error()[:200]}")

    def _set_bits(self, bits: np.ndarray) -> None:
        mask = np.unpackbits(bits.view(np.uint8), bitorder="little").view(bool)
        if mask.size < self.vocab:  # logits past the tokenizer's last token (padding): never allowed
            mask = np.concatenate([mask, np.zeros(self.vocab - mask.size, bool)])
        self._mask = mask[: self.vocab]

    def allowed(self) -> np.ndarray:
        """``bool[vocab]``: the tokens the grammar allows next (a stop token only where it accepts)."""
        self._check()
        if self._mask is None:
            bits = np.full(self.words, -1, np.int32)
            self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            self._check()
            self._set_bits(bits)
        assert self._mask is not None
        return self._mask

    def advance(self, token: int) -> None:
        """Consume the chosen token (it must be one :meth:`allowed` allowed)."""
        self._mask = None
        self._matcher.consume_token(token)
        self._check()

    @property
    def stopped(self) -> bool:
        """The grammar can take no more tokens: the answer is complete."""
        return bool(self._matcher.is_stopped())


class Constraints:
    """Compiles response formats for one bundle's tokenizer; ``vocab`` is the width of its logits."""

    def __init__(self, tokenizer_json: Path, vocab: int, eos: Sequence[int]) -> None:
        self._path, self._vocab, self._eos = tokenizer_json, vocab, sorted(eos)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        # Checked grammars by source, most recently used last: a fleet asks in the same few schemas
        # over and over, and checking one compiles it (on the MQTT thread, for MQTT requests).
        self._checked_grammars: OrderedDict[str, Grammar] = OrderedDict()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer (built on first use: it walks the whole vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = llguidance.LLTokenizer(str(self._path), eos_token=self._eos or None)
                except ValueError as exc:
                    raise RequestError(
                        "bad_request",
                        f"field 'response_format': this model's tokenizer cannot be constrained: {exc}",
                    ) from exc
            return self._tokenizer

    def compile(self, fmt: ResponseFormat | None) -> Grammar | None:
        """The checked grammar of ``fmt``; None for no constraint (absent or ``text``)."""
        if fmt is None or fmt.type == "text":
            return None
        field = "response_format"
        try:
            if fmt.type == "json_object":
                source = llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_DEFAULTS)
            elif fmt.type == "json_schema":
                assert fmt.json_schema is not None
                field = "response_format.json_schema.schema"
                source = llguidance.LLMatcher.grammar_from_json_schema(
                    json.dumps(fmt.json_schema.json_schema), defaults=_JSON_DEFAULTS
                )
            elif fmt.type == "regex":
                assert fmt.regex is not None
                field = "response_format.regex"
                source = llguidance.LLMatcher.grammar_from_regex(fmt.regex)
            else:
                assert fmt.lark is not None
                field = "response_format.lark"
                source = llguidance.LLMatcher.grammar_from_lark(fmt.lark)
        except ValueError as exc:
            raise _refused(field, str(exc)) from exc
        return self._checked(source, field)

    def compile_lark(self, lark: str, field: str) -> Grammar:
        """A Lark grammar built by the agent itself (a forced tool call); ``field`` is what a
        failure names (the request's part the grammar came from)."""
        return self._checked(llguidance.LLMatcher.grammar_from_lark(lark), field)

    def _checked(self, source: str, field: str) -> Grammar:
        with self._lock:
            if (known := self._checked_grammars.get(source)) is not None:
                self._checked_grammars.move_to_end(source)
                return known
        problem = llguidance.LLMatcher.validate_grammar(source, self.tokenizer)
        if problem:
            raise _refused(field, problem)  # a refused grammar is not kept: it is checked again
        grammar = Grammar(self.tokenizer, source, self._vocab)
        with self._lock:
            self._checked_grammars[source] = grammar
            while len(self._checked_grammars) > _CHECKED_KEPT:
                self._checked_grammars.popitem(last=False)
        return grammar


def _refused(field: str, why: str) -> RequestError:
    first = why.strip().splitlines()[0] if why.strip() else "does not compile"
    return RequestError("bad_request", f"field {field!r}: {first[:300]}")


class _Pending:
    """Masks being computed for one step; :meth:`wait` hands each to its constraint."""

    def __init__(self, future: Future[None] | None, constraints: list[Constraint], bits: np.ndarray) -> None:
        self._future, self._constraints, self._bits = future, constraints, bits

    def wait(self) -> None:
        """Hand the computed masks over (once; later calls do nothing). A row whose parser failed
        gets no mask: its own :meth:`Constraint.allowed` raises, failing that request alone."""
        if self._future is None:
            return
        future, self._future = self._future, None
        future.result()
        for i, constraint in enumerate(self._constraints):
            if not constraint._matcher.is_error():
                constraint._set_bits(self._bits[i])


class MaskPool:
    """Computes the masks of a step's constrained rows in parallel while the model runs.

    ``start`` returns at once; llguidance's executor works on its own threads with the GIL
    released, so the decode step (ONNX Runtime releases the GIL too) runs at the same time.
    """

    def __init__(self, threads: int | None = None) -> None:
        self._executor = llguidance.LLExecutor(threads)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="edge-masks")

    def start(self, constraints: Sequence[Constraint]) -> _Pending:
        todo = [c for c in constraints if c._mask is None]
        if not todo:
            return _Pending(None, [], np.empty(0, np.int32))
        bits = np.full((len(todo), todo[0].words), -1, np.int32)
        rows = [(c._matcher, i) for i, c in enumerate(todo)]
        executor = self._executor

        def compute() -> None:  # holds ``bits`` alive for as long as llguidance writes into it
            executor.unsafe_compute_mask_ptr(rows, bits.ctypes.data, bits.shape[1] * 4, len(todo))

        future = self._thread.submit(compute)
        return _Pending(future, todo, bits)

    def close(self) -> None:
        self._thread.shutdown(wait=False)
