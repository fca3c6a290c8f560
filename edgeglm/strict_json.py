"""JSON as the network may send it, read strictly: one meaning per document or it is refused.

``loads`` is :func:`json.loads` that also refuses what the standard library lets through and a
signature would then cover ambiguously: a key twice in one object (``json.loads`` keeps the last,
another parser the first), ``NaN`` and ``Infinity``, and numbers too large for a float. It raises
``ValueError`` (or ``RecursionError`` for absurd nesting), as ``json.loads`` does; each caller turns
that into its own error type.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["loads"]


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {twice[:60]!r} appears twice in one object")
    return obj


def loads(raw: str | bytes | bytearray) -> Any:
    """The JSON value of ``raw``; ``ValueError`` for anything ``json.loads`` refuses and more."""
    return json.loads(raw, parse_constant=_constant, parse_float=_finite, object_pairs_hook=_unique)
