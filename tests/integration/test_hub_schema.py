"""schemathesis against the hub's own OpenAPI spec, on SQLite and on PostgreSQL, as each role.

The hub is seeded with realistic state (``hub_seed``: releases, an open upload, labelled devices,
a rollout, a root of trust, their audit rows). Then, for every operation of the spec:

1. its known-good requests, the ones that must succeed (on a fresh object where the call uses one
   up: a token to revoke, an upload to commit, a rollout to pause...);
2. schemathesis' coverage phase: its deterministic boundary cases (empty, too long, wrong type...);
3. schemathesis' generated cases, positive and negative (its strategies driven by hypothesis: its
   pytest plugin does not run on this pytest), and as many again with the path parameters and key
   body fields taken from the seeded objects, so that they get past the 404s. The routes that read
   their body raw document it (a Manifest, the piece's bytes, a RootDocument) but FastAPI never
   parses it: schemathesis generates to that schema, and they get arbitrary bytes and JSON too.

Each case is sent without a token (or with a generated one), as viewer, as operator and as admin.
Whatever is sent: no answer is a 5xx; each role the route allows gets at least one 2xx; a role it
refuses never does (and a known-good request it refuses answers exactly 401 or 403).

The hub checks the token before it reads a body (``cloud_hub.guard``): a generated case sent
without a valid token gets 401 whatever its body, or 400 when a parameter holds a control
character (NUL included: ``GET /api/v1/audit?actor=%00`` was a 503 on PostgreSQL), nothing else.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from sqlalchemy import select

from cloud_hub.models import Rollout
from tests.integration.hub_seed import DEVICES, MODEL, OPEN, PROFILE, RUNNING, TARGET, Seeded, seed

pytestmark = pytest.mark.integration

ROLES = ("anonymous", "viewer", "operator", "admin")  # least to most: each may do what those before may
MAX_EXAMPLES = 25  # generated cases per operation and database, each sent four times

# the role table of cloud_hub/routes/__init__.py: the least role each operation needs
LEAST_ROLE = {
    "GET /healthz": "anonymous",
    "GET /metrics": "anonymous",
    "GET /api/v1/whoami": "viewer",
    "GET /api/v1/tokens": "admin",
    "POST /api/v1/tokens": "admin",
    "DELETE /api/v1/tokens/{name}": "admin",
    "POST /api/v1/uploads": "operator",
    "POST /api/v1/uploads?force": "admin",  # publishing a failed gate anyway
    "GET /api/v1/uploads/{upload_id}": "operator",
    "PUT /api/v1/uploads/{upload_id}/pieces/{piece}": "operator",
    "POST /api/v1/uploads/{upload_id}/commit": "operator",
    "GET /api/v1/releases": "viewer",
    "GET /api/v1/releases/{model}/{version}": "viewer",
    "GET /api/v1/releases/{model}/{version}/bundles/{profile}/manifest": "viewer",
    "GET /api/v1/devices": "viewer",
    "GET /api/v1/devices/{device_id}": "viewer",
    "PUT /api/v1/devices/{device_id}/pin": "operator",
    "DELETE /api/v1/devices/{device_id}/pin": "operator",
    "PATCH /api/v1/devices/{device_id}/labels": "operator",
    "PUT /api/v1/devices/{device_id}/http-access": "operator",
    "GET /api/v1/audit": "viewer",
    "GET /api/v1/trust/root": "viewer",
    "GET /api/v1/trust/roots": "viewer",
    "POST /api/v1/trust/roots": "admin",
    "POST /api/v1/rollouts": "operator",
    "GET /api/v1/rollouts": "viewer",
    "GET /api/v1/rollouts/{rollout_id}": "viewer",
    "POST /api/v1/rollouts/{rollout_id}/{action}": "operator",
    "POST /api/v1/rollbacks": "operator",
}

# the routes that read their body raw (documented in the spec, parsed by the route itself): besides
# the cases schemathesis generates from the spec, they get arbitrary bytes and JSON
RAW_BODY = {
    "POST /api/v1/uploads",
    "PUT /api/v1/uploads/{upload_id}/pieces/{piece}",
    "POST /api/v1/trust/roots",
}
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)

Request = dict[str, Any]  # schemathesis Case arguments: path_parameters, query, body, media_type


def known_good(seeded: Seeded) -> dict[str, list[Request | Callable[[], Request]]]:
    """Per route (a key of LEAST_ROLE): requests that succeed for every role it allows; a callable
    makes a fresh object for each call (a revoked token, a committed upload, a paused rollout...)."""
    release = {"model": MODEL, "version": TARGET}
    json = "application/json"
    manifest = next(seeded.publisher.root.glob(f"{MODEL}-{OPEN}-*")) / "manifest.json"
    pid, data = seeded.open_piece
    return {
        "GET /healthz": [{}],
        "GET /metrics": [{}],
        "GET /api/v1/whoami": [{}],
        "GET /api/v1/tokens": [{}],
        "POST /api/v1/tokens": [lambda: seeded.fresh("token-name")],
        "DELETE /api/v1/tokens/{name}": [lambda: seeded.fresh("token")],
        "POST /api/v1/uploads": [{"body": manifest.read_bytes(), "media_type": json}],
        "POST /api/v1/uploads?force": [
            {
                "body": manifest.read_bytes(),
                "media_type": json,
                "query": {"force": "true"},
            }
        ],
        "GET /api/v1/uploads/{upload_id}": [
            {"path_parameters": {"upload_id": seeded.open_upload}},
            {"path_parameters": {"upload_id": seeded.committed_upload}},
        ],
        "PUT /api/v1/uploads/{upload_id}/pieces/{piece}": [
            {
                "path_parameters": {"upload_id": seeded.open_upload, "piece": pid},
                "body": data,
                "media_type": "application/octet-stream",
            }
        ],
        "POST /api/v1/uploads/{upload_id}/commit": [lambda: seeded.fresh("complete-upload")],
        "GET /api/v1/releases": [{}, {"query": {"model": MODEL}}],
        "GET /api/v1/releases/{model}/{version}": [{"path_parameters": release}],
        "GET /api/v1/releases/{model}/{version}/bundles/{profile}/manifest": [
            {"path_parameters": {**release, "profile": PROFILE}}
        ],
        "GET /api/v1/devices": [{}, {"query": {"selector": "site=plant-7,line=2", "online": "true"}}],
        "GET /api/v1/devices/{device_id}": [{"path_parameters": {"device_id": d}} for d in DEVICES],
        "PUT /api/v1/devices/{device_id}/pin": [
            {"path_parameters": {"device_id": DEVICES[0]}, "body": {"version": RUNNING}, "media_type": json}
        ],
        "DELETE /api/v1/devices/{device_id}/pin": [{"path_parameters": {"device_id": DEVICES[0]}}],
        "PATCH /api/v1/devices/{device_id}/labels": [
            {"path_parameters": {"device_id": DEVICES[1]}, "body": {"set": {"rack": "b"}}, "media_type": json}
        ],
        "PUT /api/v1/devices/{device_id}/http-access": [
            {"path_parameters": {"device_id": DEVICES[1]}, "body": {"allowed": True}, "media_type": json}
        ],
        "GET /api/v1/audit": [
            {},
            {
                "query": {
                    "actor": "operator-token",
                    "action": "release.publish",
                    "target": "release/",
                    "limit": 5,
                }
            },
        ],
        "GET /api/v1/trust/root": [{}],
        "GET /api/v1/trust/roots": [{}],
        "POST /api/v1/trust/roots": [lambda: seeded.fresh("root")],
        "POST /api/v1/rollouts": [
            {"body": {"release": f"{MODEL}@{TARGET}", "dry_run": True}, "media_type": json},
            lambda: seeded.fresh("deploy"),
        ],
        "GET /api/v1/rollouts": [{}, {"query": {"state": "running"}}],
        "GET /api/v1/rollouts/{rollout_id}": [
            {"path_parameters": {"rollout_id": seeded.rollout_id}},
            {"path_parameters": {"rollout_id": seeded.rollout_id}, "query": {"devices": "false"}},
        ],
        "POST /api/v1/rollouts/{rollout_id}/{action}": [
            lambda: seeded.fresh("pause"),
            lambda: seeded.fresh("resume"),
            lambda: seeded.fresh("abort"),
        ],
        "POST /api/v1/rollbacks": [{"body": {"model": MODEL, "selector": {}}, "media_type": json}],
    }


def seeded_values(seeded: Seeded) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """Path parameters to draw from (never a role's own token name), and body fields to set."""
    with seeded.hub.ctx.db.session() as s:
        rollouts = list(s.scalars(select(Rollout.id)))
    path = {
        "upload_id": [seeded.open_upload, seeded.committed_upload],
        "piece": [seeded.open_piece[0]],
        "model": [MODEL],
        "version": [RUNNING, TARGET],
        "profile": [PROFILE],
        "device_id": list(DEVICES),
        "rollout_id": rollouts,
    }
    body = {
        "POST /api/v1/rollouts": {"release": f"{MODEL}@{TARGET}"},
        "PUT /api/v1/devices/{device_id}/pin": {"version": RUNNING},
        "POST /api/v1/rollbacks": {"model": MODEL},
    }
    return path, body


def _route(case: Any) -> str:
    route = f"{case.method.upper()} {case.operation.path}"
    force = str((case.query or {}).get("force", "")).lower() in ("true", "1", "yes", "on")
    return f"{route}?force" if route == "POST /api/v1/uploads" and force else route


def _allowed(route: str, role: str) -> bool:
    return ROLES.index(role) >= ROLES.index(LEAST_ROLE[route])


def _fuzzing(op: Any, route: str, path_pool: dict[str, list[Any]], body_fields: dict[str, Any]) -> Any:
    """schemathesis' cases for ``op``, positive and negative, and more on the seeded objects."""
    strategies = [op.as_strategy(), op.as_strategy(GenerationMode.NEGATIVE)]
    names = [p.name for p in op.iter_parameters() if p.location == "path"]
    seeded_paths = st.fixed_dictionaries({n: st.sampled_from(path_pool.get(n, [])) for n in names})
    if names and all(n in path_pool for n in names):
        strategies.append(seeded_paths.flatmap(lambda pp: op.as_strategy(path_parameters=pp)))
    if route in body_fields:
        strategies.append(op.as_strategy().map(lambda case: _steer(case, body_fields[route])))
    if route in RAW_BODY:
        raw = st.binary(max_size=512) | _JSON.map(lambda v: json.dumps(v).encode())
        octets = "application/octet-stream"
        strategies.append(
            st.builds(lambda pp, b: op.Case(path_parameters=pp, body=b, media_type=octets), seeded_paths, raw)
        )
    return st.one_of(strategies)


def _steer(case: Any, fields: dict[str, Any]) -> Any:
    if isinstance(case.body, dict):
        case.body.update(fields)
    return case


def _coverage(op: Any, schema: Any, test: Callable[[Any], None]) -> None:
    """schemathesis' coverage phase for ``op``: its deterministic boundary cases (empty, too long,
    wrong type, missing...), each passed to ``test``. The one seam to schemathesis' test builder,
    which its pytest plugin and its runner use alike."""
    from schemathesis.generation.hypothesis.builder import (
        HypothesisTestConfig,
        HypothesisTestMode,
        create_test,
    )

    config = HypothesisTestConfig(
        project=schema.config,
        modes=[HypothesisTestMode.COVERAGE],
        settings=settings(database=None, phases=[Phase.explicit], deadline=None),
    )
    create_test(operation=op, test_func=test, config=config)()


@pytest.fixture
def seeded(hub: Any, publisher: Any) -> Seeded:
    return seed(hub, publisher)


def test_every_role_gets_its_2xx_and_no_request_makes_the_hub_fail(seeded: Seeded) -> None:
    hub = seeded.hub
    schema = schemathesis.openapi.from_asgi("/openapi.json", hub.client.app)
    operations = {f"{r.ok().method.upper()} {r.ok().path}": r.ok() for r in schema.get_all_operations()}
    assert set(operations) == {r for r in LEAST_ROLE if "?" not in r}, "LEAST_ROLE must name every route"

    headers = {role: hub.as_(role) for role in ROLES[1:]} | {"anonymous": {}}
    seen: dict[tuple[str, str], set[int]] = defaultdict(set)  # (route, role) -> statuses
    refused_known_good: list[str] = []
    anonymous_not_401: list[str] = []
    server_errors: list[str] = []
    counts: dict[str, int] = defaultdict(int)  # cases per phase
    generated_2xx: set[tuple[str, str]] = set()  # (route, role) that a generated case got a 2xx for
    spec_bodies: set[str] = set()  # raw-body routes sent a JSON object schemathesis drew from the spec

    def send(case: Any, role: str, phase: str = "known-good") -> int:
        response = case.call(headers=headers[role])
        route = _route(case)
        seen[route, role].add(response.status_code)
        if phase != "known-good" and 200 <= response.status_code < 300:
            generated_2xx.add((route, role))
        control = response.status_code == 400 and "control character" in response.text
        api = case.path.startswith("/api/v1/")
        if role == "anonymous" and api and response.status_code != 401 and not control:
            anonymous_not_401.append(f"{case.method} {case.formatted_path} -> {response.status_code}")
        if response.status_code >= 500:
            query = "&".join(f"{k}={v!r}" for k, v in (case.query or {}).items())
            server_errors.append(
                f"{role}: {case.method} {case.formatted_path}?{query} body={str(case.body)[:120]}"
                f" -> {response.status_code} {response.text[:200]}"
            )
        return int(response.status_code)

    def every_role(phase: str) -> Callable[[Any], None]:
        def test(case: Any) -> None:
            counts[phase] += 1
            if _route(case).split("?")[0] in RAW_BODY and isinstance(case.body, dict):
                spec_bodies.add(_route(case).split("?")[0])
            for role in ROLES:
                send(case, role, phase)

        return test

    # 1. the known-good requests, as every role (the generated ones below change what they rely on)
    for route, requests in known_good(seeded).items():
        op = operations[route.split("?")[0]]
        for request in requests:
            for role in ROLES:
                status = send(op.Case(**(request() if callable(request) else request)), role)
                if not _allowed(route, role) and status not in (401, 403):
                    refused_known_good.append(f"{role}: {route} -> {status}")
    # 2. schemathesis' boundary cases, then 3. its generated ones, half on the seeded objects
    path_pool, body_fields = seeded_values(seeded)
    for route, op in operations.items():
        _coverage(op, schema, every_role("coverage"))
        fuzz = settings(
            max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )(given(case=_fuzzing(op, route, path_pool, body_fields))(every_role("fuzzing")))
        fuzz()

    allowed = [(r, role) for r in LEAST_ROLE for role in ROLES if _allowed(r, role)]
    print(
        f"cases sent as each of {ROLES}: {dict(counts)}; generated cases got a 2xx for"
        f" {len(generated_2xx & set(allowed))} of the {len(allowed)} allowed (route, role)"
    )
    assert server_errors == []
    allowed_without_2xx = [
        f"{role}: {r} {sorted(seen[r, role])}"
        for r in LEAST_ROLE
        for role in ROLES
        if _allowed(r, role) and not any(200 <= c < 300 for c in seen[r, role])
    ]
    assert allowed_without_2xx == [], "a role the route allows never got a 2xx"
    refused_with_2xx = [
        f"{role}: {r} {sorted(seen[r, role])}"
        for r in LEAST_ROLE
        for role in ROLES
        if not _allowed(r, role) and any(200 <= c < 300 for c in seen[r, role])
    ]
    assert refused_with_2xx == [], "a role the route refuses got a 2xx"
    assert refused_known_good == [], "a role the route refuses must get 401 or 403"
    assert anonymous_not_401 == [], "without a token: 401 before anything is read"
    assert counts["fuzzing"] >= MAX_EXAMPLES * len(operations) // 2
    assert spec_bodies == {"POST /api/v1/uploads", "POST /api/v1/trust/roots"}, "the documented bodies"
    assert counts["coverage"] >= 10 * len(operations)
