"""Both ``/metrics`` pass ``promtool check metrics`` (the Prometheus project's own linter, Debian
package ``prometheus``), and the hub's fleet gauges say what its inventory holds.

The agent: a real tiny bundle served by the real HTTP front over loopback, after requests that
fill its counters and histograms. The hub: the seeded hub of the schemathesis run (SQLite and
PostgreSQL) with more devices and rollouts in several states, its latency histogram labelled by
route template, and a database that stops answering the fleet queries.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import text

from cloud_hub.models import Device
from tests.integration.hub_seed import MODEL, PROFILE, RUNNING, TARGET, seed

pytestmark = pytest.mark.integration

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus; .ci/run does)"
)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def promtool_check(exposition: str) -> None:
    """``promtool check metrics`` reads the text on stdin; any finding fails (it exits 1)."""
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, ""), exposition


def parse(exposition: str) -> tuple[dict[str, str], Samples]:
    """{family: HELP text} and {(sample name, labels): value}."""
    helps: dict[str, str] = {}
    samples: Samples = {}
    for line in exposition.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            helps[name] = help_text
        elif line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, line
            labels = frozenset(_LABEL.findall(match[2] or ""))
            samples[(match[1], labels)] = float(match[3])
    return helps, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _check_helps(helps: dict[str, str]) -> None:
    for name, help_text in helps.items():
        assert help_text and help_text != name, f"{name}: HELP must say what it counts"


# ---------------------------------------------------------------------------------- the agent
def _call(url: str, method: str, path: str, body: Any = None) -> tuple[int, bytes, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.headers
    finally:
        conn.close()


@needs_promtool
def test_the_agents_metrics_pass_promtool(tiny_bundle: Any) -> None:
    from edge_agent.http_api import HttpApi
    from edge_agent.inference.engine import Engine
    from edge_agent.inference.scheduler import Scheduler
    from edge_agent.metrics import Metrics

    folder, profile, _ = tiny_bundle("fused-int8")
    engine = Engine.load(folder, profile=profile)
    metrics = Metrics(model=engine.model, version=engine.version)
    promtool_check(metrics.render())  # before anything was served: families without samples
    with Scheduler(engine, metrics=metrics) as scheduler:
        api = HttpApi(engine, scheduler, metrics).start()
        try:
            ok = _call(api.url, "POST", "/v1/completions", {"prompt": "Check the valve", "max_tokens": 3})
            assert ok[0] == 200, ok[1]
            chat = {"model": engine.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert _call(api.url, "POST", "/v1/chat/completions", chat)[0] == 200
            too_long = {"prompt": "word " * 5_000, "max_tokens": 2}
            assert _call(api.url, "POST", "/v1/completions", too_long)[0] >= 400
            status, body, headers = _call(api.url, "GET", "/metrics")
        finally:
            api.stop()
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    exposition = body.decode()
    promtool_check(exposition)
    helps, samples = parse(exposition)
    _check_helps(helps)
    assert value(samples, "edgeglm_agent_request_latency_seconds_count") >= 2
    assert value(samples, "edgeglm_agent_model_info", model=engine.model, version=engine.version) == 1


# ------------------------------------------------------------------------------------ the hub
def _scrape(hub: Any) -> tuple[dict[str, str], Samples]:
    r = hub.client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    promtool_check(r.text)
    return parse(r.text)


@needs_promtool
def test_the_hubs_metrics_pass_promtool_and_count_the_fleet(hub: Any, publisher: Any) -> None:
    seeded = seed(hub, publisher)  # box-1, box-2 online and box-3 offline, all glm-tiny@1.0.0; a rollout
    with hub.ctx.db.session() as s:
        s.add(
            Device(
                id="arm-1", profile="cpu-arm-int8", online=True, current_model=MODEL, current_version=TARGET
            )
        )
        s.add(Device(id="new-1", profile=None, online=False))  # registered, nothing installed yet
    aborted = seeded.rollout_id
    paused = seeded.new_rollout()  # aborts the seeded one first (one active rollout per device)
    assert seeded.post(f"/api/v1/rollouts/{paused}/pause").status_code == 200
    admin = hub.as_("admin")
    for device in ("box-1", "box-2", "nobody"):  # three raw paths, one route template
        hub.client.get(f"/api/v1/devices/{device}", headers=admin)
    hub.client.get("/no/such/path")
    hub.client.request("BREW", "/healthz")

    helps, samples = _scrape(hub)
    _check_helps(helps)
    gauges = {
        name: {dict(labels).popitem()[1]: v for (n, labels), v in samples.items() if n == name}
        for name in (
            "edgeglm_hub_devices",
            "edgeglm_hub_devices_by_version",
            "edgeglm_hub_devices_by_profile",
        )
    }
    assert gauges == {
        "edgeglm_hub_devices": {"true": 3, "false": 2},
        "edgeglm_hub_devices_by_version": {f"{MODEL}@{RUNNING}": 3, f"{MODEL}@{TARGET}": 1, "none": 1},
        "edgeglm_hub_devices_by_profile": {PROFILE: 3, "cpu-arm-int8": 1, "none": 1},
    }
    states = {dict(labels)["state"]: v for (n, labels), v in samples.items() if n == "edgeglm_hub_rollouts"}
    assert states == {
        "running": 0,
        "paused": 1,
        "aborted": 1,
        "completed": 0,
        "reverted": 0,
        "rolled_back": 0,
        "failed": 0,
    }, (aborted, paused)
    assert value(samples, "edgeglm_hub_database_up") == 1

    latency = "edgeglm_hub_http_request_duration_seconds_count"
    routes = {dict(labels)["route"] for (n, labels), _ in samples.items() if n == latency}
    assert not any("box-" in r or "nobody" in r or "/no/such" in r for r in routes), routes
    assert value(samples, latency, route="/api/v1/devices/{device_id}", method="GET") == 3
    assert value(samples, latency, route="unmatched", method="GET") == 1
    assert value(samples, latency, route="/healthz", method="other") == 1  # BREW: no new label value
    assert value(samples, "edgeglm_hub_http_requests_total", method="other", status="405") == 1
    assert value(samples, "edgeglm_hub_pieces_received_total", new="true") >= 1  # seeding published
    assert value(samples, "edgeglm_hub_device_messages_dropped_total", reason="wrong_device") == 0

    # The fleet queries fail: the gauges are left out, the counters are still served.
    with hub.ctx.db.session() as s:
        s.execute(text("ALTER TABLE rollouts RENAME TO rollouts_gone"))
    helps, samples = _scrape(hub)
    assert value(samples, "edgeglm_hub_database_up") == 0
    assert "edgeglm_hub_devices" not in helps and "edgeglm_hub_rollouts" not in helps
    assert value(samples, "edgeglm_hub_http_requests_total", method="GET", status="404") >= 2
