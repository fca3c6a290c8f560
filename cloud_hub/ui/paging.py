"""Keyset paging of the dashboard's long lists (the fleet, a wave's devices): a page is at most
``limit`` rows (:data:`PAGE` unless asked, at most :data:`LIMIT_MAX`) ordered by device id, and
``?after=<id>`` starts the next page after that id. Both are checked before any query runs; a
value that is not a device name or not a number in range is a 400 page, never a query.

A filter the database cannot apply (a fleet selector's labels, matched by
``cloud_hub.inventory``) is applied in Python over chunks of :data:`SCAN_CHUNK` rows, and a page
stops after :data:`SCAN_MAX` scanned rows even if it is not full: its "continue" link scans on
from the last id scanned, so no request reads the whole fleet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.requests import Request

from edgeglm.contracts import NAME_PATTERN
from edgeglm.errors import UsageError

__all__ = ["LIMIT_MAX", "PAGE", "SCAN_CHUNK", "SCAN_MAX", "Paging", "link"]

PAGE = 200
LIMIT_MAX = 500
SCAN_CHUNK = 1000
SCAN_MAX = 20_000

_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class Paging:
    """Where a page starts (after ``after``; None: at the first id) and how many rows it holds."""

    after: str | None = None
    limit: int = PAGE
    limit_asked: bool = False  # kept in the links only when the caller chose it

    @classmethod
    def of(cls, request: Request) -> Paging:
        params = request.query_params
        after = params.get("after", "")
        if after and not _NAME.fullmatch(after):
            raise UsageError("after", f"{after[:70]!r} is not a device name (letters, digits, ._-; 1-64)")
        text = params.get("limit", "")
        if text and (not re.fullmatch(r"[0-9]{1,4}", text) or not 1 <= int(text) <= LIMIT_MAX):
            raise UsageError("limit", f"{text[:20]!r}: give a number of rows from 1 to {LIMIT_MAX}")
        return cls(after or None, int(text) if text else PAGE, bool(text))

    def query(self, kept: Mapping[str, str], after: str | None) -> str:
        """The query string of a page with the same filters (``kept``, empty ones dropped) that
        starts after ``after``."""
        return link(kept, after, self.limit if self.limit_asked else None)


def link(kept: Mapping[str, str], after: str | None, limit: int | None = None) -> str:
    values = {k: v for k, v in kept.items() if v}
    if limit is not None:
        values["limit"] = str(limit)
    if after is not None:
        values["after"] = after
    return "?" + urlencode(values) if values else "?"
