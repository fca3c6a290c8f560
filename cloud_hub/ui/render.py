"""Turning a page's data into HTML: the Jinja2 environment (autoescape on everything), the filters
that give every number its unit and every time its relative and absolute form, and the security
headers every /ui answer carries (:class:`SecurityHeaders`).

    CSP          default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'
                 (no inline script or style: the pages load /ui/static files only)
    framing      X-Frame-Options: DENY (and frame-ancestors 'none')
    others       X-Content-Type-Options: nosniff, Referrer-Policy: same-origin,
                 Cache-Control: no-store on pages (a signed-in page is never cached)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.datastructures import MutableHeaders
from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CSP", "SecurityHeaders", "environment", "page"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
)


def relative(at: datetime | None, now: datetime | None = None) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago`` (``in 4 s`` ahead); ``never`` for None."""
    if at is None:
        return "never"
    now = now or datetime.now(UTC)
    seconds = (now - at).total_seconds()
    ahead, seconds = seconds < 0, abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    else:
        amount = f"{int(seconds)} s"
    return f"in {amount}" if ahead else f"{amount} ago"


def iso(at: datetime | None) -> str:
    return "" if at is None else at.astimezone(UTC).isoformat(timespec="seconds")


def absolute(at: datetime | None) -> str:
    return "" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def size(n: int | float | None) -> str:
    """Bytes with a binary unit: ``512 B``, ``3.2 KiB``, ``1.50 MiB``, ``2.00 GiB``."""
    if n is None:
        return "–"
    value = float(n)
    if value < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit == "KiB" else f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


def ms(value: Any) -> str:
    return "–" if value is None else f"{float(value):.0f} ms"


def percent(value: Any) -> str:
    """A ratio (0..1) as a percentage: ``0.0125`` -> ``1.25 %``."""
    return "–" if value is None else f"{float(value) * 100:.2f} %"


def number(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def as_json(value: Any) -> str:
    """A document as JSON text (escaped by the template like any other text)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def environment() -> Environment:
    """The templates of :mod:`cloud_hub.ui` (package data), every value escaped."""
    env = Environment(
        loader=PackageLoader("cloud_hub.ui", "templates"),
        autoescape=True,  # every template, whatever its name: nothing reaches a page unescaped
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        relative=relative,
        iso=iso,
        absolute=absolute,
        size=size,
        ms=ms,
        percent=percent,
        number=number,
        as_json=as_json,
    )
    return env


def page(env: Environment, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = env.get_template(template).render(**values)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


class SecurityHeaders:
    """ASGI middleware: the headers above on every answer of the dashboard, static files and
    errors included."""

    def __init__(self, app: ASGIApp, extra: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.extra = dict(extra or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in (*_HEADERS, *self.extra.items()):
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, secured)
