"""Assembling a hub process from its settings: database, piece store, trusted keys, the app, MQTT."""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

from fastapi import FastAPI

from cloud_hub import trust
from cloud_hub.api import create_app
from cloud_hub.context import HubContext
from cloud_hub.controller import Controller
from cloud_hub.database_storage import DatabaseStorage
from cloud_hub.db import Database, open_db
from cloud_hub.desired import FleetKey
from cloud_hub.gateway import Gateway
from cloud_hub.ingest import Ingest
from cloud_hub.metrics import HubMetrics
from cloud_hub.piece_storage import FolderStorage, PieceStorage, StoreKind
from cloud_hub.rollouts import Publish
from cloud_hub.settings import HubSettings
from cloud_hub.ui import create_ui
from edgeglm.errors import ConfigError
from edgeglm.keys import load_public_keys
from edgeglm.mqtt import BrokerSettings, MqttLink
from edgeglm.piece_store import PieceStore
from edgeglm.protocol import TopicKind, device_filter, hub_subscriptions

__all__ = [
    "build_context",
    "listen",
    "load_app",
    "mqtt_publisher",
    "open_store",
    "start_controller",
    "start_ingest",
]

log = logging.getLogger(__name__)


def build_context(settings: HubSettings) -> HubContext:
    db = open_db(settings.database_url)
    trusted = dict(load_public_keys(list(settings.trusted_keys))) if settings.trusted_keys else {}
    if not trusted:
        log.warning("no trusted publisher keys: every publish will be refused (pass --trust KEY.pub)")
    if settings.pieces_url is not None and _in_clear(settings.pieces_url):
        log.warning(
            "--pieces-url %s is plain http to a host that is not this one: every box's bearer token"
            " travels in clear (use https, or a proxy on the boxes' own network)",
            settings.pieces_url,
        )
    return HubContext(
        db=db,
        store=open_store(settings, db),
        trusted=trusted,
        metrics=HubMetrics(),
        max_piece_bytes=settings.max_piece_bytes,
        fleet=FleetKey.load_or_create(settings.fleet_key_path, pieces_url=settings.pieces_url),
        fetch_limits=settings.fetch_limits,
        public_url=settings.public_url,
    )


def _in_clear(pieces_url: str) -> bool:
    """Whether devices would send their HTTP credential unencrypted off this host."""
    parts = urlsplit(pieces_url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def open_store(settings: HubSettings, db: Database) -> PieceStorage:
    """The piece store ``settings.store`` names on ``db`` (``auto``: the database on PostgreSQL).

    A database store next to a data folder that still holds pieces says how to move them: the
    replicas cannot read them there."""
    kind = settings.store_kind(db.dialect)
    store: PieceStorage
    if kind is StoreKind.FOLDER:
        store = FolderStorage(settings.pieces_dir)
        if db.dialect == "postgresql":
            log.warning(
                "pieces are in the folder %s: replicas on this database do not share them (--store database)",
                settings.pieces_dir,
            )
    else:
        store = DatabaseStorage(db)
        old = settings.pieces_dir
        if (old / "objects").is_dir() and next(PieceStore(old).ids(), None) is not None:
            log.warning(
                "the folder %s still holds pieces the database store does not serve: copy them with"
                " 'edgectl hub store import %s' (or publish those bundles again), then remove the folder",
                old,
                old,
            )
    log.info("piece store: %s (--store %s)", store.description, settings.store.value)
    return store


def listen(settings: HubSettings) -> socket.socket:
    """The HTTP API's listening socket, bound before anything else starts: a taken port or an
    address that is not this host's is a :class:`ConfigError` naming ``--listen``."""
    host, port = settings.host.strip("[]"), settings.port
    where = f"{settings.host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError("--listen", f"cannot listen on {where}: {exc}", hint=_LISTEN_HINT) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, never a live port
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError("--listen", f"cannot listen on {where}: {exc.strerror}", hint=_LISTEN_HINT) from exc
    return sock


_LISTEN_HINT = "Stop what holds the port, or give another host:port with --listen (or EDGEGLM_HUB_LISTEN)."


def load_app(ctx: HubContext) -> FastAPI:
    """The HTTP API, with the dashboard (:mod:`cloud_hub.ui`) mounted at ``/ui``."""
    app = create_app(ctx)
    app.mount("/ui", create_ui(ctx, public_url=ctx.public_url))
    return app


def start_ingest(
    ctx: HubContext,
    broker: BrokerSettings,
    client_id: str,
    *,
    group: str = "hub",
    offline_after_s: float = 90.0,
) -> tuple[MqttLink, Ingest]:
    """Consume device status, heartbeats, update reports and fetch requests (shared subscriptions)."""
    ingest = Ingest(ctx.db, ctx.metrics, offline_after_s=offline_after_s).start()
    link = MqttLink(broker, client_id)

    def send(topic: str, payload: bytes, correlation: bytes) -> None:
        link.publish(topic, payload, qos=1, correlation=correlation)

    ctx.gateway = Gateway(ctx.db, ctx.piece_encoder(), send, ctx.metrics, limits=ctx.fetch_limits)
    device_kinds = {device_filter(k) for k in (TopicKind.STATUS, TopicKind.HEARTBEAT, TopicKind.REPORT)}
    for topic_filter, qos in hub_subscriptions(group):
        plain = topic_filter.split("/", 2)[2]
        if plain in device_kinds:
            link.subscribe(topic_filter, qos, ingest.on_message)
        elif plain == device_filter(TopicKind.FETCH):
            link.subscribe(topic_filter, qos, ctx.gateway.on_message)
    try:
        link.connect()
    except Exception:
        ingest.stop()
        ctx.gateway.close()
        raise
    ctx.publish = mqtt_publisher(link)
    with ctx.db.session() as s:  # boxes read the root-of-trust chain from the retained message
        latest = trust.latest_root(s)
        trust.publish_chain(s, ctx.publish)
    if latest is not None and ctx.fleet is not None and ctx.fleet.key_id not in latest.role("fleet"):
        log.warning(
            "the fleet key %s is not in root version %d: boxes refuse the desired states it signs",
            ctx.fleet.key_id,
            latest.version,
        )
    return link, ingest


def mqtt_publisher(link: MqttLink) -> Publish:
    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        link.publish(topic, payload, qos=qos, retain=retain)

    return publish


def start_controller(
    ctx: HubContext, holder: str, *, tick_s: float = 0.5, lease_s: float = 10.0
) -> Controller:
    """The rollout controller; it only acts while this process holds the database lease."""
    return Controller(ctx.db, ctx.publish, holder, fleet=ctx.fleet, tick_s=tick_s, lease_s=lease_s).start()
