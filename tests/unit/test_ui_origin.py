"""The dashboard behind a proxy that rewrites the Host header (docs/hub-production.md's nginx
without ``proxy_set_header Host``): a form's Origin is checked against the hub's public URL when
one is set (cloud_hub.ui.access.same_origin), so signing in works there, and only there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.settings import HubSettings, public_origin
from edgeglm.errors import ConfigError
from tests.unit.ui_hub import add_token, client_of, csrf_of, new_hub

PUBLIC = "https://hub.example.com"
UPSTREAM = {"Host": "hub_replicas"}  # what nginx's proxy_pass http://hub_replicas; sends


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from cloud_hub.auth import Role

    ctx = new_hub(tmp_path_factory.mktemp("ui-origin"))
    with ctx.db.session() as s:
        secret = add_token(s, "viewer-o", Role.viewer)
    yield ctx, secret
    ctx.db.dispose()


def _client(ctx: Any, public_url: str | None) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from cloud_hub.ui import create_ui

    app = Starlette(routes=[Mount("/ui", create_ui(ctx, public_url=public_url))])
    return client_of(ctx, app, base_url="https://hub_replicas")


def _sign_in(client: Any, secret: str, origin: str) -> Any:
    csrf = csrf_of(client.get("/ui/login", headers=UPSTREAM).text)
    return client.post(
        "/ui/login",
        data={"csrf": csrf, "token": secret, "next": "/ui/"},
        headers={**UPSTREAM, "Origin": origin},
    )


def test_behind_a_host_rewriting_proxy_sign_in_needs_the_public_url(hub: tuple[Any, str]) -> None:
    ctx, secret = hub
    with _client(ctx, None) as client:  # no public URL: the Origin is compared with the Host
        refused = _sign_in(client, secret, PUBLIC)
        assert refused.status_code == 403 and "another site" in refused.text
    with _client(ctx, PUBLIC + "/") as client:
        done = _sign_in(client, secret, PUBLIC)
        assert done.status_code == 303, done.text
        assert "edgeglm_ui=s1:" in done.headers["set-cookie"]
        for other in ("https://evil.test", "http://hub.example.com", "https://hub.example.com:8443", "null"):
            assert _sign_in(client, secret, other).status_code == 403, other
        # the Host header alone no longer vouches for a form
        assert _sign_in(client, secret, "https://hub_replicas").status_code == 403


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Hub.Example.com:443/", "https://hub.example.com"),
        ("http://10.0.0.11:8080", "http://10.0.0.11:8080"),
        ("https://[::1]:8443", "https://[::1]:8443"),
        ("https://hub.example.com/ui", None),
        ("ftp://hub.example.com", None),
        ("https://user@hub.example.com", None),
        ("https://hub.example.com:99999", None),
    ],
)
def test_public_origin(url: str, origin: str | None) -> None:
    assert public_origin(url) == origin


def test_a_bad_public_url_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="EDGEGLM_HUB_PUBLIC_URL"):
        HubSettings.from_env({"EDGEGLM_HUB_PUBLIC_URL": "hub.example.com"})
    assert HubSettings.from_env({"EDGEGLM_HUB_PUBLIC_URL": PUBLIC}).public_url == PUBLIC


@pytest.mark.parametrize(
    ("base", "headers", "public_url", "notice"),
    [
        ("http://10.0.0.5:8080", {}, None, True),  # plain HTTP to another host: the cookie is dropped
        ("http://hub.example.com", {}, None, True),
        ("http://127.0.0.1:8080", {}, None, False),  # loopback: browsers keep Secure cookies
        ("http://localhost:8080", {}, None, False),
        ("http://[::1]:8080", {}, None, False),
        ("https://hub.example.com", {}, None, False),
        ("http://10.0.0.5:8080", {"X-Forwarded-Proto": "https"}, None, False),  # TLS at the proxy
        ("http://10.0.0.5:8080", {}, PUBLIC, False),  # the public URL says https
        ("https://hub_replicas", {}, "http://hub.example.com", True),
    ],
)
def test_the_sign_in_page_says_when_the_cookie_cannot_stick(
    hub: tuple[Any, str], base: str, headers: dict[str, str], public_url: str | None, notice: bool
) -> None:
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from cloud_hub.ui import create_ui

    ctx, _ = hub
    app = Starlette(routes=[Mount("/ui", create_ui(ctx, public_url=public_url))])
    with TestClient(app, base_url=base) as client:
        page = client.get("/ui/login", headers=headers)
    assert page.status_code == 200
    assert ('id="insecure"' in page.text) is notice
    if notice:
        assert "your browser will not keep it" in page.text


def test_the_served_hub_takes_its_public_url_from_the_settings(tmp_path: Path) -> None:
    """``EDGEGLM_HUB_PUBLIC_URL`` reaches the dashboard of the app ``hub serve`` runs."""
    from cloud_hub.auth import Role

    ctx = new_hub(tmp_path, env={"EDGEGLM_HUB_PUBLIC_URL": PUBLIC})
    try:
        with ctx.db.session() as s:
            secret = add_token(s, "viewer-p", Role.viewer)
        with client_of(ctx, base_url="https://hub_replicas") as client:
            assert _sign_in(client, secret, PUBLIC).status_code == 303
            assert _sign_in(client, secret, "https://hub_replicas").status_code == 403
    finally:
        ctx.db.dispose()
