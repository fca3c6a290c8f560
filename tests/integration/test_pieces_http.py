"""Piece bytes over HTTP: the hub's piece routes, device credentials, and agents that take an update
over HTTP when the desired state offers it and over MQTT for the rest.

One hub (SQLite, a private mosquitto, its HTTP API served by uvicorn on a loopback port) for the
module; each agent is the daemon's update worker, machine and fetchers on a real MQTT link, with a
fake activator (these bundles hold tensors, not a model). Each test prints the bytes each path
carried, as the agents' and the hub's metrics count them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgectl.demo.procs import ManagedBroker, wait_for
from tests.integration.hub_process import free_port
from tests.integration.test_hub_rollouts import register
from tests.tensor_bundles import tensor_bundle

pytestmark = pytest.mark.integration

MODEL, PROFILE, OLD, NEW = "glm-tiny", "cpu-x86-int4", "1.0.0", "1.1.0"
QUERY = f"model={MODEL}&version={NEW}&profile={PROFILE}"


class _Anything:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Anything()


class _Activator:
    """The machine's ``activate``: the slot's manifest must verify (no engine: tensors only)."""

    def __init__(self, trusted: Any) -> None:
        self.trusted = trusted

    def __call__(self, folder: Path) -> None:
        from edgeglm.bundle import load_manifest

        load_manifest(folder, self.trusted)

    def discard(self) -> None:
        pass

    def serving(self) -> None:
        return None


class _Corrupting(BaseHTTPRequestHandler):
    """A proxy in front of the hub that flips one byte of the first piece body it passes on."""

    hub_port = 0
    flipped: list[str] = []  # noqa: RUF012 - the paths it corrupted, one at most
    lock = threading.Lock()

    def do_GET(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.hub_port, timeout=10)
        conn.request("GET", self.path, headers={"Authorization": self.headers.get("Authorization", "")})
        resp = conn.getresponse()
        body = bytearray(resp.read())
        with self.lock:
            if resp.status == 200 and len(body) > 100 and not self.flipped:
                body[len(body) // 2] ^= 0x01
                self.flipped.append(self.path)
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("date", "server", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(bytes(body))
        conn.close()

    def log_message(self, *_args: Any) -> None:
        pass


@dataclass
class World:
    root: Path
    broker: ManagedBroker
    ctx: Any
    port: int
    proxy_port: int
    old: Path
    new: Path
    trusted: dict[str, Any]
    operator: str

    def request(
        self, path: str, token: str | None, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers={**auth, **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def desire(
        self, device_id: str, *, publish: bool = True, fleet: Any = None, reported: str | None = OLD
    ) -> str | None:
        """Register ``device_id`` as running ``reported`` (as its heartbeat says) and make NEW its
        desired release; the desired state's token."""
        from cloud_hub.desired import publish_desired
        from cloud_hub.models import Device

        sent: list[bytes] = []

        def capture(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            sent.append(payload)
            if publish:
                self.ctx.publish(topic, payload, qos, retain)

        with self.ctx.db.session() as s:
            device = s.get(Device, device_id) or Device(id=device_id, profile=PROFILE)
            if reported is not None:
                device.current_model, device.current_version = MODEL, reported
            s.add(device)
            s.flush()
            publish_desired(s, device, MODEL, NEW, None, capture, fleet=fleet or self.ctx.fleet)
        token: str | None = json.loads(sent[-1]).get("pieces_token")
        return token

    def served(self) -> dict[str, float]:
        m = self.ctx.metrics
        return {
            f"{what}_{t}": m.value(f"edgeglm_hub_{name}_total", transport=t)
            for what, name in (("pieces", "pieces_served"), ("bytes", "piece_bytes_served"))
            for t in ("http", "mqtt")
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import uvicorn

    from cloud_hub.auth import Role, create_token
    from cloud_hub.db import migrate
    from cloud_hub.server import build_context, load_app, start_ingest
    from cloud_hub.settings import HubSettings
    from edgeglm.keys import create_keypair, load_private_key, load_public_keys
    from edgeglm.mqtt import BrokerSettings

    root = tmp_path_factory.mktemp("pieces-http")
    private, public, _ = create_keypair(root / "keys", "release")
    key = load_private_key(private)
    old = tensor_bundle(root / "bundles", key, OLD, 0.0, piece_bytes=64 * 1024)
    new = tensor_bundle(root / "bundles", key, NEW, 1e-3, piece_bytes=64 * 1024)
    broker = ManagedBroker(root / "broker").start()
    url = f"sqlite:///{root / 'hub.db'}"
    migrate(url)
    port, proxy_port = free_port(), free_port()
    settings = HubSettings(
        data_dir=root / "hub", db_url=url, trusted_keys=(public,), pieces_url=f"http://127.0.0.1:{port}"
    )
    ctx = build_context(settings)
    register(ctx, old)
    register(ctx, new)
    with ctx.db.session() as s:
        _, operator = create_token(s, "operator-token", Role.operator, "test-setup")
    link, ingest = start_ingest(ctx, BrokerSettings(port=broker.port), f"hub-{uuid.uuid4().hex[:6]}")
    server = uvicorn.Server(uvicorn.Config(load_app(ctx), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, name="hub-http", daemon=True).start()
    wait_for(lambda: server.started, 20, "the hub's HTTP server")
    _Corrupting.hub_port = port
    proxy = ThreadingHTTPServer(("127.0.0.1", proxy_port), _Corrupting)
    threading.Thread(target=proxy.serve_forever, name="corrupting-proxy", daemon=True).start()
    trusted = dict(load_public_keys([public]))
    try:
        yield World(root, broker, ctx, port, proxy_port, old, new, trusted, operator)
    finally:
        proxy.shutdown()
        server.should_exit = True
        link.close()
        ingest.stop()
        ctx.gateway.close()
        ctx.db.dispose()
        broker.stop()


class Box:
    """An agent's update path as the daemon builds it (edge_agent.daemon.Agent._worker), OLD installed."""

    def __init__(self, world: World, device_id: str, *, http: bool) -> None:
        from edge_agent.fetch import MqttFetcher
        from edge_agent.fetch_http import HttpFirstFetcher, HttpPieces
        from edge_agent.metrics import Metrics
        from edge_agent.update.slots import Slots
        from edge_agent.update.state import StateStore
        from edge_agent.update.worker import UpdateWorker
        from edgeglm.assembler import assemble_bundle
        from edgeglm.bundle import load_manifest
        from edgeglm.bundle_files import ingest_folder
        from edgeglm.mqtt import BrokerSettings, MqttLink
        from edgeglm.piece_store import PieceStore
        from edgeglm.protocol import desired_topic

        root = world.root / device_id
        self.slots = Slots(root / "slots")
        store = PieceStore(root / "pieces")
        m_old, doc_old = load_manifest(world.old, None)
        ingest_folder(world.old, m_old, store)
        assemble_bundle(m_old, doc_old, store, self.slots.clear("b"))
        self.slots.switch("b")
        self.metrics = Metrics()
        self.link = MqttLink(BrokerSettings(port=world.broker.port), device_id).connect()
        mqtt = MqttFetcher(
            self.link,
            device_id,
            timeout_s=10,
            holds=store.__contains__,
            on_bytes=lambda n: self.metrics.update_bytes("mqtt", n),
        )
        fetcher: Any = mqtt
        if http:
            fetcher = HttpFirstFetcher(
                mqtt,
                HttpPieces(timeout_s=10, holds=store.__contains__),
                on_bytes=self.metrics.update_bytes,
                on_fallback=self.metrics.http_fallback,
            )
        self.state = StateStore(root / "agent.db")
        fleet = world.ctx.fleet
        self.worker = UpdateWorker(
            self.state,
            store,
            self.slots,
            fetcher,
            world.trusted,
            _Activator(world.trusted),  # type: ignore[arg-type]
            device_id=device_id,
            fleet_keys={fleet.key_id: fleet.private.public_key()},
            profile=PROFILE,
            report=lambda *_args: None,
            offer=fetcher.offer if http else None,
        ).start()
        self.link.subscribe(desired_topic(device_id), 1, self.worker.on_desired)

    def updated(self, timeout: float = 60.0) -> str:
        def ended() -> str | None:
            rec = self.state.latest()
            return rec.step if rec is not None and rec.step in ("committed", "failed") else None

        step: str = wait_for(ended, timeout, "the update to end")
        return step

    def slot_digests(self) -> dict[str, str]:
        active = self.slots.active
        return {
            str(p.relative_to(active)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(active.rglob("*"))
            if p.is_file()
        }

    def counted(self) -> dict[str, float]:
        wanted = ("edgeglm_agent_update_bytes_total", "edgeglm_agent_update_http_fallbacks_total")
        out = {}
        for line in self.metrics.render().splitlines():
            if line.startswith(wanted):
                name, value = line.rsplit(" ", 1)
                out[name.removeprefix("edgeglm_agent_update_")] = float(value)
        return out

    def fetched(self) -> list[str]:
        return list(self.worker.machine.fetched)

    def close(self) -> None:
        self.worker.stop()
        self.link.close()
        self.state.close()


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def test_the_same_update_over_http_and_over_mqtt_gives_identical_slots(world: World) -> None:
    results: dict[str, tuple[dict[str, str], dict[str, float], dict[str, float]]] = {}
    for device_id, over_http in (("box-http", True), ("box-mqtt", False)):
        box = Box(world, device_id, http=over_http)
        try:
            before = world.served()
            world.desire(device_id)
            assert box.updated() == "committed"
            fetched = box.fetched()
            assert fetched and len(fetched) == len(set(fetched)), "a verified piece was fetched twice"
            results[device_id] = (box.slot_digests(), box.counted(), _delta(world.served(), before))
        finally:
            box.close()
    for device_id, (_, agent, hub) in results.items():
        print(f"{device_id}: agent received {agent}; hub served {hub}")
    (over_http, agent_http, hub_http), (over_mqtt, agent_mqtt, hub_mqtt) = results.values()
    assert over_http == over_mqtt and over_http, "the slots differ"
    assert agent_http['bytes_total{transport="http"}'] > 0
    assert agent_http['bytes_total{transport="mqtt"}'] == 0
    assert (
        hub_http["bytes_http"] == agent_http['bytes_total{transport="http"}'] and hub_http["bytes_mqtt"] == 0
    )
    assert agent_mqtt['bytes_total{transport="http"}'] == 0
    assert (
        hub_mqtt["bytes_mqtt"] == agent_mqtt['bytes_total{transport="mqtt"}'] > 0
        and hub_mqtt["bytes_http"] == 0
    )
    assert hub_http["pieces_http"] == hub_mqtt["pieces_mqtt"]  # the same pieces, the same encodings
    assert hub_http["bytes_http"] == hub_mqtt["bytes_mqtt"]


def test_the_piece_routes_answer_immutably_with_ranges_and_refuse_out_of_scope(world: World) -> None:
    from edgeglm.bundle import load_manifest
    from edgeglm.piece_store import PieceStore
    from edgeglm.planner import receive
    from edgeglm.protocol import DELTA_ENCODINGS, PieceEncoding
    from edgeglm.tensor_delta import Encoded

    token = world.desire("box-routes", publish=False)
    assert token is not None
    new, old = load_manifest(world.new, None)[0], load_manifest(world.old, None)[0]
    changed = next(p for p, _ in new.files[0].pieces if p not in old.piece_ids())
    raw_path = f"/api/v1/pieces/{changed}?{QUERY}"
    status, headers, body = world.request(raw_path, token)
    assert status == 200, body
    etag = f'"{changed}"'
    assert headers["etag"] == etag and headers["cache-control"] == "public, max-age=31536000, immutable"
    assert headers["accept-ranges"] == "bytes" and int(headers["content-length"]) == len(body)
    encoding = PieceEncoding[headers["x-edgeglm-encoding"]]
    store = PieceStore(world.root / "route-check")
    size = int(headers["x-edgeglm-piece-size"])
    receive(store, changed, size, Encoded(encoding, int(headers["x-edgeglm-element-width"]), body))

    assert world.request(raw_path, token, method="HEAD")[:2] == (200, headers | {"x-trace-id": ANY})
    status, part_headers, part = world.request(raw_path, token, {"Range": "bytes=10-19"})
    assert (status, part, part_headers["content-range"]) == (206, body[10:20], f"bytes 10-19/{len(body)}")
    status, part_headers, _ = world.request(raw_path, token, {"Range": f"bytes={len(body)}-"})
    assert (status, part_headers["content-range"]) == (416, f"bytes */{len(body)}")
    assert world.request(raw_path, token, {"If-None-Match": etag})[0] == 304

    index = [p for p, _ in new.files[0].pieces].index(changed)
    base = old.files[0].pieces[index][0]  # the same tensor slice in OLD (the same layout)
    delta_path = f"/api/v1/pieces/{changed}/delta/{base}?{QUERY}&have={OLD}"
    status, headers, delta = world.request(delta_path, token)
    assert status == 200 and PieceEncoding[headers["x-edgeglm-encoding"]] in DELTA_ENCODINGS
    assert headers["x-edgeglm-base"] == base and headers["etag"] == f'"{changed}-{base}"'
    assert len(delta) < len(body)

    other = old.files[0].pieces[-1][0] if old.files[0].pieces[-1][0] != base else old.files[0].pieces[0][0]
    # a box that never held OLD must not name it: the delta and the raw piece would give the base
    curious = world.desire("box-curious", publish=False, reported=None)
    dropped = world.ctx.metrics.value("edgeglm_hub_have_dropped_total", transport="http")
    refusals = [
        (delta_path, curious, 404),
        (f"/api/v1/pieces/{changed}/delta/{other}?{QUERY}&have={OLD}", token, 404),  # not its base
        (f"/api/v1/pieces/{'0' * 64}?{QUERY}", token, 404),  # not in the bundle
        (
            f"/api/v1/pieces/{changed}?model={MODEL}&version={OLD}&profile={PROFILE}",
            token,
            403,
        ),  # not targeted
        (raw_path, None, 401),
        (raw_path, world.operator, 401),  # an API token opens no device route
        (raw_path, token[:-3] + "AAA", 401),  # forged
    ]
    for path, given, expected in refusals:
        status, headers, _ = world.request(path, given)
        assert status == expected, path
        # only a refused credential stops a box's HTTP; an out-of-scope 403 refuses one piece
        assert ("x-edgeglm-credential" in headers) == (expected == 401), path
    assert world.ctx.metrics.value("edgeglm_hub_have_dropped_total", transport="http") == dropped + 1


def test_revoking_http_access_refuses_the_credential_at_once_and_allowing_it_starts_a_new_epoch(
    world: World,
) -> None:
    from cloud_hub.device_credentials import offer
    from cloud_hub.models import AuditEntry, Device

    token = world.desire("box-revoke", publish=False)
    path = f"/api/v1/pieces/{load_piece(world)}?{QUERY}"
    assert world.request(path, token)[0] == 200

    def access(flag: str) -> dict[str, Any]:  # as an operator would, with edgectl
        from click.testing import CliRunner

        from edgectl import root

        env = {"EDGEGLM_TOKEN": world.operator, "EDGEGLM_HUB_URL": f"http://127.0.0.1:{world.port}"}
        args = ["devices", "http-access", "box-revoke", flag, "-o", "json"]
        result = CliRunner().invoke(root, args, env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        answer: dict[str, Any] = json.loads(result.output)
        return answer

    assert access("--revoke") == {"device_id": "box-revoke", "allowed": False, "epoch": 0}
    status, headers, body = world.request(path, token)
    assert status == 403 and b"revoked" in body and headers["x-edgeglm-credential"] == "refused"
    with world.ctx.db.session() as s:
        device = s.get(Device, "box-revoke")
        assert offer(world.ctx.fleet.credentials, "http://hub", device, time.time() + 60) == (None, None)
    assert access("--allow") == {"device_id": "box-revoke", "allowed": True, "epoch": 1}
    status, headers, body = world.request(path, token)
    assert status == 401 and b"superseded" in body  # the token that leaked before stays dead
    assert headers["x-edgeglm-credential"] == "refused"
    with world.ctx.db.session() as s:
        device = s.get(Device, "box-revoke")
        fresh = offer(world.ctx.fleet.credentials, "http://hub", device, time.time() + 60)[1]
        actions = [
            (e.before, e.after)
            for e in s.query(AuditEntry)
            .filter(AuditEntry.target == "device/box-revoke")
            .order_by(AuditEntry.id)
        ]
    assert world.request(path, fresh)[0] == 200
    assert actions == [
        ({"http_access": True, "http_epoch": 0}, {"http_access": False, "http_epoch": 0}),
        ({"http_access": False, "http_epoch": 0}, {"http_access": True, "http_epoch": 1}),
    ]


def load_piece(world: World) -> str:
    from edgeglm.bundle import load_manifest

    return load_manifest(world.new, None)[0].files[0].pieces[0][0]


def test_a_revoked_device_still_completes_over_mqtt(world: World) -> None:
    from cloud_hub import device_credentials

    world.desire("box-revoked")  # retained, with a token, before the box is up
    with world.ctx.db.session() as s:  # revoked where no desired state is signed again
        device_credentials.revoke(s, "box-revoked", "test")
    box = Box(world, "box-revoked", http=True)
    try:
        assert box.updated() == "committed"
        counted = box.counted()
    finally:
        box.close()
    print(f"box-revoked: agent received {counted}")
    assert counted['bytes_total{transport="http"}'] == 0
    assert counted['bytes_total{transport="mqtt"}'] > 0
    assert counted['http_fallbacks_total{reason="refused"}'] >= 1


def test_a_piece_corrupted_on_the_http_path_is_rejected_and_taken_over_mqtt(world: World) -> None:
    via_proxy = replace(world.ctx.fleet, pieces_url=f"http://127.0.0.1:{world.proxy_port}")
    box = Box(world, "box-corrupt", http=True)
    try:
        world.desire("box-corrupt", fleet=via_proxy)
        assert box.updated() == "committed"
        counted, fetched = box.counted(), box.fetched()
    finally:
        box.close()
    print(f"box-corrupt: agent received {counted}; corrupted {_Corrupting.flipped}")
    assert len(_Corrupting.flipped) == 1
    assert counted['http_fallbacks_total{reason="corrupt"}'] == 1
    assert counted['bytes_total{transport="http"}'] > 0 and counted['bytes_total{transport="mqtt"}'] > 0
    assert len(fetched) == len(set(fetched)), "a verified piece was fetched twice"


# ---------------------------------------------------------------- the agent's HTTP path, alone
# Each test below serves one connection from a raw socket scripted to misbehave; no hub needed.

STEP_SIZE = 1000
_HEADERS = (
    "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nX-Edgeglm-Encoding: {enc}\r\n"
    "X-Edgeglm-Element-Width: 0\r\nX-Edgeglm-Piece-Size: {n}\r\n\r\n"
)


class Scripted:
    """A loopback server answering each request with ``script(connection, n)`` (n counts requests)."""

    def __init__(self, script: Any) -> None:
        import socket

        self.script = script
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, name="scripted-http", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: Any) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    self.requests += 1
                    self.script(conn, self.requests)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _agent_step() -> tuple[Any, Any]:
    from edgeglm.planner import PieceStep

    return Target(), PieceStep("ab" * 32, STEP_SIZE, "raw", STEP_SIZE, None, "F16", STEP_SIZE)


@dataclass
class Target:
    model: str = MODEL
    version: str = NEW
    profile: str = PROFILE


def test_a_piece_dripped_byte_by_byte_fails_at_its_deadline() -> None:
    """timeout_s bounds each read; a server sending a byte every 0.1 s must not hold the piece."""
    from edge_agent.fetch_http import HttpOffer, HttpPieces, _Failed

    def drip(conn: Any, _n: int) -> None:
        conn.sendall(_HEADERS.format(n=STEP_SIZE, enc="RAW").encode())
        for _ in range(15):  # 1.5 s, then the server gives up (a test without the deadline ends)
            conn.sendall(b"x")
            time.sleep(0.1)
        conn.close()

    server = Scripted(drip)
    http = HttpPieces(timeout_s=0.3)
    target, step = _agent_step()
    try:
        with pytest.raises(_Failed) as failed:
            http.get(HttpOffer(server.url, "tok"), target, step, [])
    finally:
        http.close()
        server.close()
    assert failed.value.kind == "timeout", failed.value.reason
    assert failed.value.link  # counts toward "HTTP is down for the round"


def test_a_superseded_update_stops_waiting_on_http_at_once_without_mqtt() -> None:
    """The fetcher's wait loop polls ``cancelled``: a revert does not wait for a silent server."""
    from edge_agent.fetch import _Bucket
    from edge_agent.fetch_http import HttpFirstFetcher, HttpOffer, HttpPieces

    silent_until = threading.Event()
    server = Scripted(lambda _conn, _n: silent_until.wait(5))  # answers nothing (5 s at most)

    class NoMqtt:
        bucket = _Bucket(0)
        asked: list[Any] = []  # noqa: RUF012

        def pieces(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
            self.asked.append(args)
            return iter(())

    http = HttpPieces(timeout_s=30)
    fetcher = HttpFirstFetcher(NoMqtt(), http)  # type: ignore[arg-type]
    fetcher._offer = HttpOffer(server.url, "tok")
    target, step = _agent_step()
    polls: list[int] = []

    def cancelled() -> bool:  # superseded once the request is in flight
        polls.append(1)
        return server.requests > 0 and len(polls) > 2

    try:
        got = list(fetcher.pieces(target, [step], [OLD], cancelled=cancelled))
    finally:
        silent_until.set()
        server.close()
    assert got == [] and NoMqtt.asked == []
    assert server.requests == 1


def test_a_connection_whose_answer_was_refused_unread_is_not_used_again() -> None:
    """An answer refused on its headers leaves its body unread: the next request opens anew."""
    from edge_agent.fetch_http import HttpOffer, HttpPieces, _Failed

    def answer(conn: Any, n: int) -> None:  # the first answer names an encoding the agent lacks
        head = _HEADERS.format(n=STEP_SIZE, enc="FUTURE_ZSTD" if n == 1 else "RAW").encode()
        conn.sendall(head + b"x" * STEP_SIZE)

    server = Scripted(answer)
    http = HttpPieces(timeout_s=5)
    target, step = _agent_step()
    offer = HttpOffer(server.url, "tok")
    try:
        with pytest.raises(_Failed) as failed:
            http.get(offer, target, step, [])
        assert failed.value.kind == "check"
        encoded, _ = http.get(offer, target, step, [])  # not ResponseNotReady on the old one
        assert encoded.payload == b"x" * STEP_SIZE
        assert http.get(offer, target, step, [])[0] == encoded  # a read answer leaves it reusable
    finally:
        http.close()
        server.close()


def test_an_unexpected_error_on_the_http_path_falls_back_to_mqtt() -> None:
    """An offer the agent cannot use (a port past 65535 that an older hub signed) is a connection
    failure: the piece goes to MQTT instead of stopping the update."""
    from edge_agent.fetch import _Bucket
    from edge_agent.fetch_http import HttpFirstFetcher, HttpOffer, HttpPieces

    class Mqtt:
        bucket = _Bucket(0)
        asked: list[Any] = []  # noqa: RUF012

        def pieces(self, _target: Any, steps: Any, _have: Any, **_kw: Any) -> Iterator[Any]:
            self.asked.extend(steps)
            return iter(())

    fallbacks: list[str] = []
    fetcher = HttpFirstFetcher(Mqtt(), HttpPieces(timeout_s=1), on_fallback=fallbacks.append)  # type: ignore[arg-type]
    fetcher._offer = HttpOffer("https://hub.example:99999", "tok")
    target, step = _agent_step()
    assert list(fetcher.pieces(target, [step], [])) == []
    assert Mqtt.asked == [step] and fallbacks == ["connection"]


@pytest.mark.parametrize(("credential", "kind"), [("refused", "refused"), (None, "forbidden")])
def test_only_a_refused_credential_stops_http(credential: str | None, kind: str) -> None:
    from edge_agent.fetch_http import HttpOffer, HttpPieces, _Failed

    marked = f"X-Edgeglm-Credential: {credential}\r\n" if credential else ""

    def answer(conn: Any, _n: int) -> None:
        conn.sendall(f"HTTP/1.1 403 Forbidden\r\n{marked}Content-Length: 2\r\n\r\n{{}}".encode())

    server = Scripted(answer)
    http = HttpPieces(timeout_s=5)
    target, step = _agent_step()
    try:
        with pytest.raises(_Failed) as failed:
            http.get(HttpOffer(server.url, "tok"), target, step, [])
    finally:
        http.close()
        server.close()
    assert (failed.value.kind, failed.value.auth) == (kind, credential is not None)
