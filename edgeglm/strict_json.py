"""JSON as the network may send it, read strictly: one meaning per document or it is refused.

``loads`` is :func:`json.loads` that also refuses what the standard library lets through and a
signature would then cover ambiguously, or a later encoder would choke on: bytes that are not
UTF-8 (``json.loads(bytes)`` guesses UTF-16 and UTF-32 and skips a byte order mark), a key twice
in one object (``json.loads`` keeps the last, another parser the first), ``NaN`` and
``Infinity``, numbers too large for a float, and a lone surrogate escape (``"\\ud800"``: a str
no signer wrote and no UTF-8 encoder takes). It raises ``ValueError`` (``UnicodeDecodeError`` is
one) or ``RecursionError`` for absurd nesting, as ``json.loads`` does; each caller turns that into
its own error type.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["loads"]

_SURROGATE = re.compile("[\ud800-\udfff]")


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
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
    if isinstance(raw, str) and _SURROGATE.search(text):  # bytes that decoded hold none
        raise ValueError("the text holds a lone surrogate, not valid Unicode")
    value = json.loads(text, parse_constant=_constant, parse_float=_finite, object_pairs_hook=_unique)
    if "\\u" in text:  # only an escape can make one now: re-encode what was read to find it
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate escape, not valid Unicode") from None
    return value
