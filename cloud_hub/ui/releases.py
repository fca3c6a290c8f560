"""The Releases page: every model's versions, newest first, with each profile's bundle.

GET /ui/releases    per version: dataset version, who published it and when; per profile:
                    bytes, pieces, the quality gate's verdict and the metrics the manifest
                    records (max |Δlogit|, cosine, top-1 agreement, KL, greedy prefix), each
                    against the profile's threshold where the manifest names one
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from cloud_hub.models import Bundle
from cloud_hub.registry import Registry
from cloud_hub.ui.access import Ui
from cloud_hub.ui.session import SignedIn

__all__ = ["METRICS", "quality_rows", "releases_page"]

# (manifest field, label, threshold key) in the order the export's quality gate reports them
METRICS = (
    ("max_abs_logit_diff", "max |Δlogit|", "max_abs_logit_diff"),
    ("cosine", "cosine", "cosine"),
    ("top1_agreement", "top-1 agreement", "top1_agreement"),
    ("kl", "KL divergence", "kl"),
    ("greedy_prefix_agreement", "greedy prefix agreement", "greedy_prefix_agreement"),
)


def quality_rows(bundle: Bundle) -> list[dict[str, Any]]:
    """The quality metrics a bundle's manifest records, each with its threshold if it has one."""
    q = bundle.quality or {}
    thresholds = q.get("thresholds") or {}
    return [
        {"label": label, "value": q[field], "threshold": thresholds.get(key)}
        for field, label, key in METRICS
        if q.get(field) is not None
    ]


def releases_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    with ui.hub.db.session() as s:
        releases = Registry(s, None, {}).releases()  # type: ignore[arg-type]  # reading only
        models = [
            (name, list(reversed(list(group))))
            for name, group in groupby(releases, key=lambda r: r.model.name)
        ]
        return ui.render(request, "releases.html", who, models=models, quality_rows=quality_rows)
