"""A small HTTP client for the hub's API (standard library HTTP: the kernel stays light).

``call(method, path, Shape)`` decodes an answer through the models of :mod:`edgeglm.hub_api`
(the ones the hub answers with), so commands work on typed values; ``request`` hands back the
plain JSON. Errors come back as the hub's :class:`~edgeglm.hub_api.ErrorView` and are raised
again here as the same :mod:`edgeglm.errors` class, so ``edgectl`` prints them and exits with
their code like any local error. A hub that cannot be reached is :class:`UnavailableError`; an
answer that is not the shape asked for is :class:`ProtocolError`. The token is sent as a bearer
header and never logged.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from edgeglm import errors
from edgeglm.errors import EdgeError, ProtocolError, UnavailableError
from edgeglm.hub_api import ErrorView

__all__ = ["DEFAULT_HUB_URL", "HubClient"]

DEFAULT_HUB_URL = "http://127.0.0.1:8080"
T = TypeVar("T")


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
        """The answer's JSON (or its bytes, when it is not JSON)."""
        body, kind = self._send(method, path, params, json_body, data, content_type)
        if "json" in kind:
            return json.loads(body) if body else None
        return body

    def call(
        self,
        method: str,
        path: str,
        shape: type[T],
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str = "application/octet-stream",
    ) -> T:
        """The answer decoded as ``shape`` (a model of :mod:`edgeglm.hub_api`, or a list of one)."""
        body, _ = self._send(method, path, params, json_body, data, content_type)
        try:
            return TypeAdapter(shape).validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "answer"
            raise ProtocolError(
                f"hub {path}",
                f"answered with no {_name(shape)}: {where}: {first['msg']}",
                hint="The hub and edgectl must be the same version; upgrade the older one.",
            ) from exc

    def get(self, path: str, shape: type[T], **params: Any) -> T:
        return self.call("GET", path, shape, params=params)

    def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None,
        json_body: Any,
        data: bytes | None,
        content_type: str,
    ) -> tuple[bytes, str]:
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
                return resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise _error_from(exc.code, exc.read(), path) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UnavailableError(
                f"hub {self.url}",
                f"cannot be reached: {reason}",
                hint="Start it with 'edgectl hub serve', or pass --hub / EDGEGLM_HUB_URL.",
            ) from exc


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _name(shape: Any) -> str:
    inner = getattr(shape, "__args__", None)
    return f"list of {inner[0].__name__}" if inner else str(getattr(shape, "__name__", shape))


def _error_from(status: int, body: bytes, path: str) -> EdgeError:
    try:
        info = ErrorView.model_validate_json(body).error
    except ValidationError:
        text = body.decode("utf-8", "replace").strip().splitlines()[:1]
        return EdgeError(f"hub {path}", f"HTTP {status}" + (f": {text[0][:200]}" if text else ""))
    cls = getattr(errors, info.type, None)
    if not (isinstance(cls, type) and issubclass(cls, EdgeError)) or cls is errors.RequestError:
        cls = EdgeError
    return cls(info.what, info.why, hint=info.hint or None)
