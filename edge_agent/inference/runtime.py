"""The agent's one seam to ONNX Runtime: sessions, execution-provider fallback, KV caches.

Two decoder graphs come out of ``edgectl export`` (see ``export/fused.py`` and
``export/standard.py``); both are driven here through one small interface, a *sequence* per
request::

    graph.open()                    -> Sequence     reserve KV space for one request
    graph.prefill(seq, ids)         -> [vocab]      logits after the prompt (chunked)
    graph.prefill(seq, ids, cache=False)            the same, neither using nor filling a prefix cache
    graph.decode([seq, ...], toks)  -> [n, vocab]   one token for each sequence, batched
    graph.close(seq)                                give the KV space back

Fused graph (GroupQueryAttention): one KV arena per layer, ``[rows, kv_heads, max_context,
head_dim]``, allocated once in anonymous memory without huge pages (RSS grows as tokens arrive).
Past and present are bound by IO binding to the *same* buffer, so GroupQueryAttention writes each
new token in place at its row's length: nothing is copied per token. Rows decode together at
different lengths (``attention_mask`` carries each row's length), so a new request joins a running
batch at the next step (continuous batching). A step runs every row up to its highest, so a request
takes the lowest free row and a step first moves its sequences down into free rows below them.
Prompts are prefilled in chunks, which bounds the ``[chunk, vocab]`` logits a long prompt
allocates. With a prefix cache (the profile's ``prefix_cache_mb``, see ``prefix_cache.py``) a
prompt starting like an earlier one gets that head's KV copied into its row and prefills only the
rest.

Standard graph (plain ONNX, optimum names, ``position_ids``): each sequence keeps its own past;
a decode step over a set of sequences left-pads and stacks their pasts once when the set changes
and then feeds ONNX Runtime's outputs straight back. The graph itself concatenates the cache
(that copy is in the graph, not here).
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.inference.prefix_cache import PrefixCache
from edgeglm.errors import ConfigError, UnavailableError

__all__ = ["DecoderGraph", "FusedGraph", "Sequence", "StandardGraph", "open_graph"]

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _session(model: Path, providers: Seq[str], threads: int) -> ort.InferenceSession:
    """A session on the first provider of ``providers`` that loads, falling back in order."""
    available = set(ort.get_available_providers())
    wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    if wanted[-1] != "CPUExecutionProvider":
        wanted.append("CPUExecutionProvider")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    last: Exception | None = None
    for start in range(len(wanted)):
        try:
            session = ort.InferenceSession(str(model), opts, providers=wanted[start:])
        except Exception as exc:  # ONNX Runtime raises untyped errors (a missing CUDA library, ...)
            log.warning("execution provider %s failed to load %s: %s", wanted[start], model.name, exc)
            last = exc
            continue
        log.info("model %s runs on %s", model.name, session.get_providers()[0])
        return session
    raise UnavailableError(
        f"ONNX model {model}", f"does not load on any execution provider: {last}"
    ) from last


@dataclass(eq=False)
class Sequence:
    """The KV state of one request; ``length`` counts the tokens already in its cache."""

    row: int = -1  # fused: arena row
    length: int = 0
    past: list[np.ndarray] | None = None  # standard: [1, kv, L, D] per cache input, left-padded
    mask: np.ndarray | None = None  # standard: [L] 1 for real tokens
    cached: int = 0  # prompt tokens whose KV came from the prefix cache, not from a prefill
    closed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _lazy_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Zeros in anonymous memory that costs RSS only where written, in 4 KiB pages.

    ``np.zeros`` is lazy too, but numpy advises huge pages for large arrays: the first token
    written to a row would then fault in 2 MiB per layer and head block, all of a row's
    max_context at once (about 112 MiB per row at GLM-Edge-1.5B, context 1024).
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(buffer, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count=int(np.prod(shape))).reshape(shape)


class DecoderGraph:
    """What both graph drivers share: the session, its cache inputs, a lock around each run."""

    joins_running: bool = True

    def __init__(self, session: ort.InferenceSession, max_context: int) -> None:
        self.session = session
        self.provider = session.get_providers()[0]
        self.max_context = max_context
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = sorted(n for n in inputs if n.startswith("past_key_values."))
        if "input_ids" not in inputs or not self.past_names:
            raise ConfigError(f"ONNX model {session}", "is not an EdgeGLM decoder graph (no input_ids/past)")
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = _DTYPES[first.type]
        vocab = next(o for o in session.get_outputs() if o.name == "logits").shape[-1]
        self.vocab = int(vocab) if isinstance(vocab, int) else 0
        self.lock = threading.Lock()

    def open(self) -> Sequence:
        return Sequence()

    def close(self, seq: Sequence) -> None:
        seq.closed = True

    def prefill(self, seq: Sequence, ids: Seq[int], *, cache: bool = True) -> np.ndarray:
        """Run the prompt ``ids`` into ``seq``'s cache; logits of its last position [vocab].

        ``cache=False`` keeps a prefix cache out of it both ways: the whole prompt is prefilled,
        as the exporter prefilled it (the smoke test's numeric path), and nothing is stored.
        """
        raise NotImplementedError

    def decode(self, seqs: Seq[Sequence], tokens: Seq[int]) -> np.ndarray:
        """One new token per sequence, all in one run; logits [len(seqs), vocab]."""
        raise NotImplementedError

    def _check_room(self, seq: Sequence, more: int) -> None:
        if seq.length + more > self.max_context:
            raise ValueError(
                f"sequence would hold {seq.length + more} tokens; the context is {self.max_context}"
            )


class FusedGraph(DecoderGraph):
    """GroupQueryAttention graph on a shared, preallocated KV arena (see the module docstring)."""

    def __init__(
        self, session: ort.InferenceSession, max_context: int, rows: int, prefix_cache_bytes: int = 0
    ) -> None:
        super().__init__(session, max_context)
        self.rows = rows
        shape = (rows, self.kv_heads, max_context, self.head_dim)
        self.arena = [_lazy_zeros(shape, self.kv_dtype) for _ in self.past_names]
        per_token = len(self.arena) * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize
        self.prefix = PrefixCache(prefix_cache_bytes, per_token) if prefix_cache_bytes else None
        self._free = list(range(rows))
        self.moves = 0  # sequences moved to a lower row (see _compact)
        self._open: dict[int, Sequence] = {}
        self._logits = np.zeros((rows, 1, max(self.vocab, 1)), np.float32)
        self._steps: dict[int, ort.IOBinding] = {}  # per span: cache and logits bound once

    def open(self) -> Sequence:
        with self.lock:
            if not self._free:
                raise RuntimeError("no free KV row")  # the scheduler never asks for more than it has
            row = min(self._free)  # the lowest free row: a step runs every row up to its highest
            self._free.remove(row)
            seq = Sequence(row=row)
            self._open[row] = seq
            return seq

    def close(self, seq: Sequence) -> None:
        with self.lock:
            if not seq.closed:
                seq.closed = True
                self._open.pop(seq.row, None)
                self._free.append(seq.row)

    def _bind_cache(self, io: ort.IOBinding, first_row: int, rows: int) -> None:
        shape = [rows, self.kv_heads, self.max_context, self.head_dim]
        for past, present, buf in zip(self.past_names, self.present_names, self.arena, strict=True):
            ptr = buf[first_row:].ctypes.data
            io.bind_input(past, "cpu", 0, self.kv_dtype, shape, ptr)
            io.bind_output(present, "cpu", 0, self.kv_dtype, shape, ptr)

    def prefill(self, seq: Sequence, ids: Seq[int], *, cache: bool = True) -> np.ndarray:
        self._check_room(seq, len(ids))
        uses_cache = seq.length == 0 and cache and self.prefix is not None
        done = self._reuse_prefix(seq, ids) if uses_cache else 0
        logits = np.zeros(0, np.float32)
        for start in range(done, len(ids), PREFILL_CHUNK):
            chunk = np.asarray([ids[start : start + PREFILL_CHUNK]], np.int64)
            with self.lock:
                io = self.session.io_binding()
                io.bind_cpu_input("input_ids", chunk)
                io.bind_cpu_input("attention_mask", np.ones((1, seq.length + chunk.shape[1]), np.int64))
                io.bind_output("logits", "cpu")
                self._bind_cache(io, seq.row, 1)
                self.session.run_with_iobinding(io)
                logits = io.get_outputs()[0].numpy()[0, -1].astype(np.float32)
                # under the lock: a concurrent decode writes its dummy token at this length
                seq.length += chunk.shape[1]
        if uses_cache:
            assert self.prefix is not None
            self.prefix.store(ids, lambda n: self._row_kv(seq.row, n))
        return logits

    def _row_kv(self, row: int, n: int) -> list[np.ndarray]:
        """A copy of the first ``n`` positions of ``row``'s KV, per cache tensor (for the prefix cache)."""
        return [buf[row, :, :n].copy() for buf in self.arena]

    def _move_kv(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` positions of row ``src``'s KV to row ``dst``; the caller holds the lock."""
        for buf in self.arena:
            buf[dst, :, :n] = buf[src, :, :n]

    def _reuse_prefix(self, seq: Sequence, ids: Seq[int]) -> int:
        """Copy the longest stored head of ``ids`` into ``seq``'s row; how many tokens it covers."""
        assert self.prefix is not None
        hit = self.prefix.lookup(ids)
        if hit is None:
            return 0
        with self.lock:
            for buf, kv in zip(self.arena, hit.kv, strict=True):
                buf[seq.row, :, : hit.tokens] = kv
            seq.length = seq.cached = hit.tokens
        return hit.tokens

    def _compact(self, seqs: Seq[Sequence]) -> None:
        """Move ``seqs`` (highest row first) into free rows below them; the caller holds the lock.

        A step runs every row up to the highest one in it, so a request left alone on row 7 of a
        drained batch would pay for eight rows each token. Moving it costs one copy of its KV.
        Only the step's own sequences move: another caller's sequence (the engine's direct loop)
        stays where its owner expects it.
        """
        for seq in sorted(seqs, key=lambda s: s.row, reverse=True):
            low = min(self._free, default=self.rows)
            if low > seq.row:
                break
            self._move_kv(seq.row, low, seq.length)
            self._free.remove(low)
            self._free.append(seq.row)
            del self._open[seq.row]
            self._open[low] = seq
            seq.row = low
            self.moves += 1

    def _step_binding(self, span: int) -> ort.IOBinding:
        """The decode binding of the first ``span`` rows: the KV arena and the logits buffer never
        move, so they are bound once per span (56 tensors at GLM-Edge-1.5B) and only the token ids
        and the mask are bound each step; the caller holds the lock."""
        io = self._steps.get(span)
        if io is None:
            io = self._steps[span] = self.session.io_binding()
            out = self._logits[:span]
            io.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self._bind_cache(io, 0, span)
        return io

    def decode(self, seqs: Seq[Sequence], tokens: Seq[int]) -> np.ndarray:
        """One step for ``seqs``; rows between them not in this step run a dummy token, unused.

        A dummy token is written at its row's current length: past everything that row's own
        sequence holds (it overwrites that slot with its next real token), so a row that another
        caller is using (the engine's direct loop) loses nothing.
        """
        for seq in seqs:
            self._check_room(seq, 1)
        # One hold of the lock from the rows' lengths to the new ones: another caller's dummy
        # token must not land on a slot this step has just written, nor this step's on its.
        with self.lock:
            self._compact(seqs)
            span = max(s.row for s in seqs) + 1
            ids = np.zeros((span, 1), np.int64)
            lengths = np.zeros(span, np.int64)  # an idle row attends to one dummy position
            for row, other in self._open.items():
                if row < span:
                    lengths[row] = min(other.length, self.max_context - 1)
            for seq, tok in zip(seqs, tokens, strict=True):
                ids[seq.row, 0] = tok
                lengths[seq.row] = seq.length
            total = int(lengths.max()) + 1
            mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
            io = self._step_binding(span)
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            self.session.run_with_iobinding(io)
            picked = self._logits[[s.row for s in seqs], 0].copy()
            for seq in seqs:
                seq.length += 1
        return picked


class StandardGraph(DecoderGraph):
    """Plain-ONNX graph in optimum's names; each sequence owns its past (see the module docstring)."""

    def __init__(self, session: ort.InferenceSession, max_context: int) -> None:
        super().__init__(session, max_context)
        self.output_names = [o.name for o in session.get_outputs()]
        self._group: tuple[Sequence, ...] = ()
        self._group_past: list[np.ndarray] = []
        self._group_mask = np.zeros((0, 0), np.int64)

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        with self.lock:
            outs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        return outs["logits"], [outs[n] for n in self.present_names]

    def prefill(self, seq: Sequence, ids: Seq[int], *, cache: bool = True) -> np.ndarray:
        self._check_room(seq, len(ids))  # no prefix cache on this route: ``cache`` changes nothing
        n = len(ids)
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :],
            **dict.fromkeys(self.past_names, empty),
        }
        logits, seq.past = self._run(feeds)
        seq.mask = np.ones(n, np.int64)
        seq.length = n
        return np.asarray(logits[0, -1], np.float32)

    def _form_group(self, seqs: tuple[Sequence, ...]) -> None:
        """Hand the old group's rows back to their sequences, then left-pad and stack the new one."""
        for i, old in enumerate(self._group):
            if not old.closed:
                old.past = [p[i : i + 1] for p in self._group_past]
                old.mask = self._group_mask[i]
        width = max(len(s.mask) for s in seqs)  # type: ignore[arg-type]
        self._group_mask = np.zeros((len(seqs), width), np.int64)
        self._group_past = [
            np.zeros((len(seqs), self.kv_heads, width, self.head_dim), self.kv_dtype) for _ in self.past_names
        ]
        for i, s in enumerate(seqs):
            assert s.past is not None and s.mask is not None
            pad = width - len(s.mask)
            self._group_mask[i, pad:] = s.mask
            for merged, own in zip(self._group_past, s.past, strict=True):
                merged[i, :, pad:] = own[0]
            s.past = None
        self._group = seqs

    def decode(self, seqs: Seq[Sequence], tokens: Seq[int]) -> np.ndarray:
        for seq in seqs:
            self._check_room(seq, 1)
        group = tuple(seqs)
        if group != self._group:
            self._form_group(group)
        mask = np.concatenate([self._group_mask, np.ones((len(group), 1), np.int64)], axis=1)
        feeds = {
            "input_ids": np.asarray(tokens, np.int64)[:, None],
            "attention_mask": mask,
            "position_ids": np.asarray([[s.length] for s in group], np.int64),
            **dict(zip(self.past_names, self._group_past, strict=True)),
        }
        logits, self._group_past = self._run(feeds)
        self._group_mask = mask
        for s in group:
            s.length += 1
        return np.asarray(logits[:, -1], np.float32)

    def close(self, seq: Sequence) -> None:
        seq.closed = True
        seq.past = None


def open_graph(
    model: Path,
    *,
    graph: str,
    providers: Seq[str],
    threads: int,
    max_context: int,
    rows: int,
    prefix_cache_bytes: int = 0,
) -> DecoderGraph:
    """Load ``model`` for the profile's route: ``fused`` (``rows`` KV rows) or ``standard``."""
    session = _session(model, providers, threads)
    if graph == "fused":
        return FusedGraph(session, max_context, rows, prefix_cache_bytes)
    if graph == "standard":
        return StandardGraph(session, max_context)
    raise ConfigError(f"ONNX model {model}", f"unknown graph route {graph!r} (fused or standard)")
