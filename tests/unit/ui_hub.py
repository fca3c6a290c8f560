"""The hub the dashboard's unit tests (tests/unit/test_ui_*.py) stand on: a migrated SQLite file and
its context, API tokens, a model's release, a rollout with its wave rows, a client of the app and a
session signed in through the login form. Each test file keeps only what is its own."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_hub.models import Model, Release, Rollout, RolloutWave

if TYPE_CHECKING:
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session

    from cloud_hub.auth import Role
    from cloud_hub.context import HubContext

HUB_URL = "https://hub.test"
ORIGIN = {"Origin": HUB_URL}
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def new_hub(tmp: Path, env: Mapping[str, str] | None = None, **settings: Any) -> HubContext:
    """A hub over a migrated SQLite file in ``tmp``, its data in ``tmp/hub``; with ``env``, its
    settings read from those ``EDGEGLM_HUB_*`` variables first. The caller disposes ``ctx.db``."""
    from cloud_hub.db import migrate
    from cloud_hub.server import build_context
    from cloud_hub.settings import HubSettings

    url = f"sqlite:///{tmp / 'hub.db'}"
    migrate(url)
    if env is not None:
        return build_context(HubSettings.from_env(env, data_dir=tmp / "hub", db_url=url, **settings))
    return build_context(HubSettings(data_dir=tmp / "hub", db_url=url, **settings))


def add_token(s: Session, name: str, role: Role) -> str:
    """A new API token ``name`` of ``role``; its secret."""
    from cloud_hub.auth import create_token

    return create_token(s, name, role, "test")[1]


def add_release(s: Session, model: str = "glm-tiny", version: str = "1.1.0") -> Release:
    """Release ``model@version`` (the model row made on its first release), flushed."""
    row = s.query(Model).filter_by(name=model).one_or_none()
    if row is None:
        row = Model(name=model)
        s.add(row)
        s.flush()
    major, minor, patch = (int(part) for part in version.split("."))
    release = Release(
        model_id=row.id, version=version, major=major, minor=minor, patch=patch, created_by="test"
    )
    s.add(release)
    s.flush()
    return release


def add_rollout(
    s: Session,
    release: Release,
    *,
    waves: Sequence[Mapping[str, float]],
    state: str,
    wave_rows: Sequence[tuple[int, str]] = (),
    gates: Sequence[str] = (),
    selector: Mapping[str, str] | None = None,
    **fields: Any,
) -> Rollout:
    """A rollout of ``release`` in ``state`` (soak 1 s, every gate judged on one sample, a failure
    reverts), flushed, with a ``RolloutWave`` row ``(size, state)`` per ``wave_rows`` entry;
    ``fields`` are further ``Rollout`` columns (``current_wave``, ``reason``)."""
    rollout = Rollout(
        release_id=release.id,
        selector=dict(selector or {}),
        waves=[dict(wave) for wave in waves],
        soak_s=1,
        success_threshold=1,
        max_failure_ratio=0,
        gates=list(gates),
        device_timeout_s=60,
        on_failure="revert",
        state=state,
        min_samples=1,
        created_by="test",
        **fields,
    )
    s.add(rollout)
    s.flush()
    for index, (size, wave_state) in enumerate(wave_rows):
        s.add(RolloutWave(rollout_id=rollout.id, index=index, size=size, state=wave_state))
    s.flush()
    return rollout


def client_of(ctx: HubContext, app: Any = None, base_url: str = HUB_URL) -> TestClient:
    """A client of ``app`` (the hub's whole app by default) that leaves redirects to the test."""
    from fastapi.testclient import TestClient

    from cloud_hub.server import load_app

    return TestClient(load_app(ctx) if app is None else app, base_url=base_url, follow_redirects=False)


def csrf_of(page: str) -> str:
    """The CSRF token of the first form on ``page``."""
    found = _CSRF.search(page)
    assert found is not None, page[-300:]
    return found[1]


def sign_in(client: Any, token: str, headers: Mapping[str, str] = ORIGIN, **fields: str) -> None:
    """Signs ``client`` in with ``token`` through the login form (its cookie jar keeps the session);
    ``fields`` are further form fields (``next``)."""
    csrf = csrf_of(client.get("/ui/login").text)
    done = client.post("/ui/login", data={"csrf": csrf, "token": token, **fields}, headers=dict(headers))
    assert done.status_code == 303, done.text
