"""Assembling a hub process from its settings: database, piece store, trusted keys, the app, MQTT."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from cloud_hub.api import HubContext, create_app
from cloud_hub.db import open_db
from cloud_hub.ingest import Ingest
from cloud_hub.metrics import HubMetrics
from cloud_hub.settings import HubSettings
from edgeglm.keys import load_public_keys
from edgeglm.mqtt import BrokerSettings, MqttLink
from edgeglm.piece_store import PieceStore
from edgeglm.protocol import TopicKind, device_filter, hub_subscriptions

__all__ = ["build_context", "load_app", "start_ingest"]

log = logging.getLogger(__name__)


def build_context(settings: HubSettings) -> HubContext:
    db = open_db(settings.database_url)
    trusted = dict(load_public_keys(list(settings.trusted_keys))) if settings.trusted_keys else {}
    if not trusted:
        log.warning("no trusted publisher keys: every publish will be refused (pass --trust KEY.pub)")
    return HubContext(
        db=db,
        store=PieceStore(settings.pieces_dir),
        trusted=trusted,
        metrics=HubMetrics(),
        max_piece_bytes=settings.max_piece_bytes,
    )


def load_app(ctx: HubContext) -> FastAPI:
    return create_app(ctx)


def start_ingest(
    ctx: HubContext,
    broker: BrokerSettings,
    client_id: str,
    *,
    group: str = "hub",
    offline_after_s: float = 90.0,
) -> tuple[MqttLink, Ingest]:
    """Consume device status and heartbeats through shared subscriptions (replicas split them)."""
    ingest = Ingest(ctx.db, ctx.metrics, offline_after_s=offline_after_s).start()
    link = MqttLink(broker, client_id)
    wanted = {device_filter(TopicKind.STATUS), device_filter(TopicKind.HEARTBEAT)}
    for topic_filter, qos in hub_subscriptions(group):
        if topic_filter.split("/", 2)[2] in wanted:
            link.subscribe(topic_filter, qos, ingest.on_message)
    link.connect()
    return link, ingest
