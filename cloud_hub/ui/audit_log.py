"""The Audit page: the append-only log, newest first, filtered and paged.

GET /ui/audit?actor=&action=&subject=&since=&until=&before=
    actor and action match exactly, subject is a prefix of the target (``rollout/12``,
    ``device/``), since / until bound the time (UTC, ``YYYY-MM-DDTHH:MM``), and ``before``
    is the id the next page starts below (:data:`PAGE` rows a page)
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from urllib.parse import urlencode

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from cloud_hub.models import AuditEntry
from cloud_hub.ui.access import Ui
from cloud_hub.ui.session import SignedIn
from edgeglm.errors import UsageError

__all__ = ["PAGE", "audit_page", "parse_time"]

PAGE = 50
_FILTERS = (("actor", 128), ("action", 64), ("subject", 256))


def parse_time(name: str, text: str) -> datetime | None:
    """``2025-01-31T12:00`` (a datetime-local field, read as UTC) or an ISO time with its offset."""
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(name, f"{text[:40]!r}: write a time as YYYY-MM-DDTHH:MM (UTC)") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def audit_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    params = request.query_params
    filters = {name: params.get(name, "").strip()[:limit] for name, limit in _FILTERS}
    since, until = params.get("since", "").strip(), params.get("until", "").strip()
    before_text = params.get("before", "")
    if before_text and not re.fullmatch(r"[0-9]{1,18}", before_text):
        raise UsageError("before", f"{before_text[:20]!r} is not an entry id")
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(PAGE + 1)
    if filters["actor"]:
        q = q.where(AuditEntry.actor == filters["actor"])
    if filters["action"]:
        q = q.where(AuditEntry.action == filters["action"])
    if filters["subject"]:
        q = q.where(AuditEntry.target.startswith(filters["subject"], autoescape=True))
    if (start := parse_time("since", since)) is not None:
        q = q.where(AuditEntry.at >= start)
    if (end := parse_time("until", until)) is not None:
        q = q.where(AuditEntry.at < end)
    if before_text:
        q = q.where(AuditEntry.id < int(before_text))
    with ui.hub.db.session() as s:
        rows = list(s.scalars(q))
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        kept = {k: v for k, v in {**filters, "since": since, "until": until}.items() if v}
        next_page = "?" + urlencode({**kept, "before": rows[-1].id}) if more and rows else ""
        first_page = "?" + urlencode(kept) if before_text else ""
        return ui.render(
            request,
            "audit.html",
            who,
            entries=rows,
            filters={**filters, "since": since, "until": until},
            next_page=next_page,
            first_page=first_page,
        )
