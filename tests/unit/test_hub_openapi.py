"""Every JSON answer in the hub's /openapi.json is a named model of the kernel's ``edgeglm.hub_api``.

A route added later without a response model (an untyped object), or with a model of its own
instead of the shared one, fails here. The app runs on a SQLite file; nothing is served.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import edgeglm.hub_api

NOT_JSON = {("get", "/metrics"): "text/plain"}  # Prometheus text, documented as such
OTHER_MODELS = {"Manifest"}  # the signed manifest, sent as its bytes (edgeglm.bundle)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from cloud_hub.db import migrate
    from cloud_hub.server import build_context, load_app
    from cloud_hub.settings import HubSettings

    root: Path = tmp_path_factory.mktemp("openapi-hub")
    url = f"sqlite:///{root / 'hub.db'}"
    migrate(url)
    ctx = build_context(HubSettings(data_dir=root, db_url=url))
    try:
        yield load_app(ctx).openapi()
    finally:
        ctx.db.dispose()


def _answers(spec: dict[str, Any]) -> Iterator[tuple[str, str, str, str, dict[str, Any]]]:
    """(method, path, status, media type, schema) of every 2xx answer."""
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            for status, answer in op["responses"].items():
                if status.startswith("2"):
                    assert answer.get("content"), f"{method.upper()} {path} {status} documents no body"
                    for media, body in answer["content"].items():
                        yield method, path, status, media, body.get("schema", {})


def _models(schema: dict[str, Any]) -> list[str]:
    """The component names a JSON answer is: one model, a list of one, or one of a few models."""
    if "$ref" in schema:
        return [schema["$ref"].removeprefix("#/components/schemas/")]
    if schema.get("type") == "array" and "$ref" in schema.get("items", {}):
        return _models(schema["items"])
    choices = schema.get("anyOf") or schema.get("oneOf") or []
    if choices and all("$ref" in c for c in choices):
        return [name for c in choices for name in _models(c)]
    return []


def test_every_json_answer_is_a_named_model_with_properties(spec: dict[str, Any]) -> None:
    components = spec["components"]["schemas"]
    untyped, not_json, seen = [], [], set()
    for method, path, status, media, schema in _answers(spec):
        where = f"{method.upper()} {path} {status}"
        if media != "application/json":
            if NOT_JSON.get((method, path)) != media:
                not_json.append(f"{where}: {media}")
            continue
        names = _models(schema)
        if not names:
            untyped.append(f"{where}: {schema}")
        for name in names:
            assert components[name].get("properties"), f"{where}: {name} declares no properties"
            seen.add(name)
    assert untyped == [], "answers without a response model"
    assert not_json == [], "answers that are not JSON"
    assert len(seen) >= 15
    foreign = seen - set(edgeglm.hub_api.__all__) - OTHER_MODELS
    assert foreign == set(), "answers must be the shared models of edgeglm.hub_api"


def test_the_text_answers_are_the_documented_ones(spec: dict[str, Any]) -> None:
    text = {(m, p): media for m, p, _, media, _ in _answers(spec) if media != "application/json"}
    assert text == NOT_JSON


# The guard checks each /api/v1 route's role and body limit before a body is read (cloud_hub.guard);
# it reads them off the routes' own dependencies. This is the table as it must be: a new route, a
# role changed by accident, or a raw-body route without its limit fails here.
ROUTE_TABLE = {
    ("GET", "/api/v1/whoami"): ("viewer", "none"),
    ("GET", "/api/v1/tokens"): ("admin", "none"),
    ("POST", "/api/v1/tokens"): ("admin", "json"),
    ("DELETE", "/api/v1/tokens/{name}"): ("admin", "none"),
    ("POST", "/api/v1/uploads"): ("operator", "raw"),
    ("GET", "/api/v1/uploads/{upload_id}"): ("operator", "none"),
    ("PUT", "/api/v1/uploads/{upload_id}/pieces/{piece}"): ("operator", "raw"),
    ("POST", "/api/v1/uploads/{upload_id}/commit"): ("operator", "none"),
    ("GET", "/api/v1/releases"): ("viewer", "none"),
    ("GET", "/api/v1/releases/{model}/{version}"): ("viewer", "none"),
    ("GET", "/api/v1/releases/{model}/{version}/bundles/{profile}/manifest"): ("viewer", "none"),
    ("GET", "/api/v1/devices"): ("viewer", "none"),
    ("GET", "/api/v1/devices/{device_id}"): ("viewer", "none"),
    ("PUT", "/api/v1/devices/{device_id}/pin"): ("operator", "json"),
    ("DELETE", "/api/v1/devices/{device_id}/pin"): ("operator", "none"),
    ("PATCH", "/api/v1/devices/{device_id}/labels"): ("operator", "json"),
    ("PUT", "/api/v1/devices/{device_id}/http-access"): ("operator", "json"),
    ("GET", "/api/v1/audit"): ("viewer", "none"),
    ("GET", "/api/v1/trust/root"): ("viewer", "none"),
    ("GET", "/api/v1/trust/roots"): ("viewer", "none"),
    ("POST", "/api/v1/trust/roots"): ("admin", "raw"),
    ("POST", "/api/v1/rollouts"): ("operator", "json"),
    ("GET", "/api/v1/rollouts"): ("viewer", "none"),
    ("GET", "/api/v1/rollouts/{rollout_id}"): ("viewer", "none"),
    ("POST", "/api/v1/rollouts/{rollout_id}/{action}"): ("operator", "none"),
    ("POST", "/api/v1/rollbacks"): ("operator", "json"),
    # a device's HTTP credential instead of a role; not in /openapi.json (devices call them)
    ("GET", "/api/v1/pieces/{piece}"): ("device", "none"),
    ("HEAD", "/api/v1/pieces/{piece}"): ("device", "none"),
    ("GET", "/api/v1/pieces/{piece}/delta/{base}"): ("device", "none"),
    ("HEAD", "/api/v1/pieces/{piece}/delta/{base}"): ("device", "none"),
}


def test_the_guard_knows_the_role_and_body_of_every_api_route(spec: dict[str, Any]) -> None:
    from cloud_hub.guard import route_rules
    from cloud_hub.routes import ROUTERS

    rules = route_rules(route for router in ROUTERS for route in router.routes)
    seen = {
        key: (
            "device" if rule.device else rule.role.name,
            "raw" if rule.raw else "json" if rule.json else "none",
        )
        for key, rule in rules.items()
    }
    assert seen == ROUTE_TABLE
    served = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if p.startswith("/api/v1/")}
    documented = {key for key, (role, _) in ROUTE_TABLE.items() if role != "device"}
    assert served == documented, "the app documents exactly the API-token routes the guard knows"


def test_every_api_route_documents_the_bearer_token(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes == {
        "HTTPBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": schemes["HTTPBearer"]["description"],
        }
    }
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            documented = op.get("security") == [{"HTTPBearer": []}]
            assert documented == path.startswith("/api/v1/"), f"{method.upper()} {path}"
            if documented:
                assert {"401", "403", "413"} <= set(op["responses"]), f"{method.upper()} {path}"


# The routes that read their body as bytes (FastAPI parses none of them) document it all the same.
RAW_BODIES = {
    ("post", "/api/v1/uploads"): ("application/json", {"$ref": "#/components/schemas/Manifest"}),
    ("put", "/api/v1/uploads/{upload_id}/pieces/{piece}"): (
        "application/octet-stream",
        {"type": "string", "format": "binary"},
    ),
    ("post", "/api/v1/trust/roots"): ("application/json", {"$ref": "#/components/schemas/RootDocument"}),
}


def test_every_route_that_takes_a_body_documents_it(spec: dict[str, Any]) -> None:
    with_body = {
        (method, path): op["requestBody"]
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if "requestBody" in op
    }
    json_routes = {(m.lower(), p) for (m, p), (_, body) in ROUTE_TABLE.items() if body == "json"}
    assert set(with_body) == json_routes | set(RAW_BODIES)
    for key, (media, schema) in RAW_BODIES.items():
        body = with_body[key]
        assert body["required"] is True and body["description"], key
        assert body["content"] == {media: {"schema": schema}}, key
    components = spec["components"]["schemas"]
    assert set(components["RootDocument"]["required"]) >= {"version", "expires_at", "keys", "root"}
    assert "signatures" in components["RootDocument"]["properties"]
    assert {"model", "version", "profile", "files"} <= set(components["Manifest"]["properties"])


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_reference_in_the_document_resolves(spec: dict[str, Any]) -> None:
    components = spec["components"]["schemas"]
    refs = set(_refs(spec))
    assert "#/components/schemas/RootDocument" in refs
    dangling = {r for r in refs if r.removeprefix("#/components/schemas/") not in components}
    assert dangling == set()


def test_every_documented_error_is_the_error_shape(spec: dict[str, Any]) -> None:
    """Each operation documents 4xx and 5xx answers, each of them an ErrorView (no FastAPI
    HTTPValidationError, no bare description)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorView"}}}
    wrong = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            statuses = {s for s in op["responses"] if s[0] in "45"}
            assert {"400", "404", "405", "422", "500", "503"} <= statuses, f"{method.upper()} {path}"
            wrong += [
                f"{method.upper()} {path} {s}" for s in statuses if op["responses"][s].get("content") != error
            ]
    assert wrong == []
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert set(spec["components"]["schemas"]["ErrorInfo"]["required"]) == {
        "type",
        "what",
        "why",
        "hint",
        "trace_id",
    }
