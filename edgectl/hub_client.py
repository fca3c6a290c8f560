"""A small HTTP client for the hub's API (standard library only: the kernel stays light).

Errors come back as the hub's ``{"error": {"type", "what", "why", "hint"}}`` body and are
raised again here as the same :mod:`edgeglm.errors` class, so ``edgectl`` prints them and exits
with their code like any local error. A hub that cannot be reached is :class:`UnavailableError`.
The token is sent as a bearer header and never logged.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from edgeglm import errors
from edgeglm.errors import EdgeError, UnavailableError

__all__ = ["DEFAULT_HUB_URL", "HubClient"]

DEFAULT_HUB_URL = "http://127.0.0.1:8080"


class HubClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0) -> None:
        self.url = (url or os.environ.get("EDGEGLM_HUB_URL") or DEFAULT_HUB_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("EDGEGLM_TOKEN", "")
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str = "application/octet-stream",
    ) -> Any:
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        url = self.url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            content_type = "application/json"
        if data is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
                kind = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise _error_from(exc.code, exc.read(), path) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UnavailableError(
                f"hub {self.url}",
                f"cannot be reached: {reason}",
                hint="Start it with 'edgectl hub serve', or pass --hub / EDGEGLM_HUB_URL.",
            ) from exc
        if "json" in kind:
            return json.loads(body) if body else None
        return body

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _error_from(status: int, body: bytes, path: str) -> EdgeError:
    try:
        info = json.loads(body)["error"]
        cls = getattr(errors, str(info["type"]), None)
        if not (isinstance(cls, type) and issubclass(cls, EdgeError)):
            cls = EdgeError
        if cls is errors.RequestError:
            cls = EdgeError
        return cls(str(info["what"]), str(info["why"]), hint=str(info.get("hint") or "") or None)
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip().splitlines()[:1]
        return EdgeError(f"hub {path}", f"HTTP {status}" + (f": {text[0][:200]}" if text else ""))
