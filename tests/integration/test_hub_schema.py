"""schemathesis against the hub's own OpenAPI spec: whatever it sends, no answer is a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.integration

_TOKENS: dict[str, str] = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from cloud_hub.auth import Role, create_token
    from cloud_hub.db import migrate
    from cloud_hub.models import Device
    from cloud_hub.server import build_context, load_app
    from cloud_hub.settings import HubSettings

    root: Path = tmp_path_factory.mktemp("schema-hub")
    url = f"sqlite:///{root / 'hub.db'}"
    migrate(url)
    ctx = build_context(HubSettings(data_dir=root, db_url=url))
    with ctx.db.session() as s:
        _, _TOKENS["admin"] = create_token(s, "fuzz-admin", Role.admin, "test")
        _, _TOKENS["viewer"] = create_token(s, "fuzz-viewer", Role.viewer, "test")
        s.add(Device(id="box-1", profile="cpu-x86-int4", labels={"site": "p7"}))
    app = load_app(ctx)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    ctx.db.dispose()


def test_no_request_makes_the_hub_fail(api_schema: Any) -> None:
    """Every operation of the spec, 30 generated cases each, as admin, as viewer and without a token.

    (schemathesis' pytest plugin does not run on this pytest; its strategies drive hypothesis here.)
    """
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    failures: list[tuple[Any, ...]] = []
    for operation in operations:

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            for headers in (
                {"Authorization": f"Bearer {_TOKENS['admin']}"},
                {"Authorization": f"Bearer {_TOKENS['viewer']}"},
                {},
            ):
                response = case.call(headers=headers)
                if response.status_code >= 500:
                    failures.append(
                        (case.method, case.formatted_path, response.status_code, response.text[:200])
                    )

        check()
    assert failures == []
