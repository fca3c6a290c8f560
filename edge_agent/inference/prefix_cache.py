"""Prompt KV reuse across requests: a bounded store of recent prompts' key/value caches.

Sensor requests on one site share a long fixed head: the chat template, an operator's system
prompt, the instructions around the reading. Prefill is compute-bound (every prompt token costs
about as much as a batched decode token), so recomputing that head for each request is most of
what a short request costs. After a prompt is prefilled, its KV rows are copied here; a later
prompt that starts with the same tokens copies the longest shared part back into its own KV row
and prefills only the rest.

Reuse is exact: a causal decoder's keys and values at positions ``0..n-1`` depend only on the
tokens ``0..n-1`` (rotary positions are absolute), so the reused rows are the ones a fresh prefill
would write, up to float rounding between kernel shapes.

The store keeps prompt tokens only, never generated ones, least recently used first out, within
``budget_bytes``. A prompt that extends a stored one replaces it; one that parts from a stored one
after a shared head cuts that entry back to the head (see :meth:`PrefixCache.store`), so sensors
whose prompts differ only in the reading share one copy of the instruction. At least one token of
every prompt is always run, since the logits of the last prompt position are needed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

__all__ = ["PrefixCache", "PrefixHit"]

MIN_TOKENS = 8  # below this a hit saves less than the bookkeeping costs


@dataclass(eq=False)
class _Entry:
    ids: np.ndarray  # [n] int64
    kv: list[np.ndarray]  # per cache tensor: [kv_heads, n, head_dim]
    used: int = 0
    parted: bool = False  # cut back to a head that prompts share: not extended again

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in self.kv)


@dataclass(frozen=True)
class PrefixHit:
    """``tokens`` leading prompt tokens whose KV is ``kv`` (views into the stored entry: read only)."""

    tokens: int
    kv: list[np.ndarray]


class PrefixCache:
    def __init__(self, budget_bytes: int, bytes_per_token: int, min_tokens: int = MIN_TOKENS) -> None:
        if budget_bytes < 0 or bytes_per_token <= 0:
            raise ValueError("budget_bytes must be >= 0 and bytes_per_token > 0")
        self.budget = budget_bytes
        self.per_token = bytes_per_token
        self.min_tokens = max(1, min_tokens)
        self._entries: list[_Entry] = []
        self._tick = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    @property
    def max_tokens(self) -> int:
        """The longest prompt head one entry can hold."""
        return self.budget // self.per_token

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lookup(self, ids: Seq[int]) -> PrefixHit | None:
        """The longest stored head of ``ids`` (never all of it), if at least ``min_tokens`` long."""
        want = np.asarray(ids, np.int64)[:-1]  # the last prompt token always runs
        with self._lock:
            best, best_n = self._longest(want)
            if best is None or best_n < self.min_tokens:
                self.misses += 1
                return None
            self._tick += 1
            best.used = self._tick
            self.hits += 1
            self.reused_tokens += best_n
            return PrefixHit(best_n, [k[:, :best_n] for k in best.kv])

    def store(self, ids: Seq[int], read: Callable[[int], list[np.ndarray]]) -> bool:
        """Keep what the prompt ``ids`` adds; ``read(n)`` returns copies of its first ``n`` positions.

        Against the entry sharing the longest head with ``ids`` (at least ``min_tokens``):

        - ``ids`` extends it: ``ids`` replaces it (the same prompt again stores nothing), unless
          the entry is a head that prompts were seen to share;
        - they part after a shared head that is at least half of the entry: the entry is cut back
          to that head and ``ids`` is not stored, so prompts that differ only in their tail
          converge on one copy of their head instead of one copy each.

        Otherwise (nothing shared, or a short common start such as the chat template's first
        tokens) ``ids`` is stored whole, up to the budget. Returns whether an entry was
        added.
        """
        n = min(len(ids), self.max_tokens)
        if n < self.min_tokens:
            return False
        head = np.asarray(ids[:n], np.int64)
        with self._lock:
            best, shared = self._longest(head)
            if best is not None and shared >= self.min_tokens:
                if shared == n:
                    return False  # held already
                if shared == len(best.ids) and best.parted:
                    return False  # one more tail of a head that prompts share
                if shared < len(best.ids) and 2 * shared >= len(best.ids):
                    best.ids = best.ids[:shared].copy()  # parted: keep only the head both share
                    best.kv = [k[:, :shared].copy() for k in best.kv]
                    best.parted = True
                    return False
        kv = read(n)  # outside the lock: a copy of a few MB
        entry = _Entry(head, kv)
        with self._lock:
            # an entry that is a head of this prompt says nothing this one does not
            self._entries = [e for e in self._entries if _common(e.ids, head) < len(e.ids)]
            self._entries.sort(key=lambda e: e.used)
            held = sum(e.nbytes for e in self._entries)
            while self._entries and held + entry.nbytes > self.budget:
                held -= self._entries.pop(0).nbytes
            self._tick += 1
            entry.used = self._tick
            self._entries.append(entry)
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries = []

    def _longest(self, ids: np.ndarray) -> tuple[_Entry | None, int]:
        """The entry sharing the longest head with ``ids``, and that length (call under the lock)."""
        best, best_n = None, 0
        for entry in self._entries:
            if (n := _common(entry.ids, ids)) > best_n:
                best, best_n = entry, n
        return best, best_n


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common head of two token arrays."""
    m = min(len(a), len(b))
    if m == 0:
        return 0
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m
