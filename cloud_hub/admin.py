"""What ``edgectl hub`` does where the hub runs: its schema, its tokens, its broker ACL, serving it.

The composition root reaches the hub wing through this module only (an import-linter contract
says so); each function takes the settings built once in the entrypoint and opens the database
itself.

    HubSettings.from_env(**flags)            the settings: flags > environment > defaults
    migrate(settings)                        schema to this version's head -> (before, after)
    grant_role(settings, role)               PostgreSQL: the role the hub serves as (not the owner)
    listen(settings)                         the HTTP API's socket (ConfigError if it is taken)
    running(settings, broker=...)            the app (and with a broker, MQTT + the controller)
    create_token / list_tokens / revoke_token    audited as ``actor``, like the API's
    registered_devices(settings)             every device id in the inventory
    gc(settings, dry_run=...)                the piece store without what no bundle or upload names
    import_pieces(settings, folder)          an old folder store's pieces into the configured store
    write_acl(out, devices, hub_users, ...)  mosquitto password file and ACL (owner: the broker)
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub import db, piece_gc, tokens
from cloud_hub.broker_acl import write_acl
from cloud_hub.models import Device
from cloud_hub.piece_gc import GcReport, ImportReport
from cloud_hub.piece_storage import PieceStorage, StoreKind
from cloud_hub.server import build_context, listen, load_app, open_store, start_controller, start_ingest
from cloud_hub.settings import HubSettings
from edgeglm.hub_api import NewTokenView, TokenRole, TokenView
from edgeglm.mqtt import BrokerSettings

__all__ = [
    "GcReport",
    "HubSettings",
    "ImportReport",
    "RunningHub",
    "StoreKind",
    "create_token",
    "gc",
    "grant_role",
    "import_pieces",
    "list_tokens",
    "listen",
    "migrate",
    "registered_devices",
    "revoke_token",
    "running",
    "write_acl",
]


def migrate(settings: HubSettings) -> tuple[str | None, str]:
    """The schema's revision before and after bringing it to this version's head."""
    return db.migrate(settings.database_url)


def grant_role(settings: HubSettings, role: str) -> str:
    """Let ``role`` serve the hub without owning its tables (run as the owner); answers the schema."""
    return db.grant_hub_role(settings.database_url, role)


@dataclass(frozen=True)
class RunningHub:
    app: FastAPI
    dialect: str  # sqlite or postgresql


@contextmanager
def running(
    settings: HubSettings,
    *,
    broker: BrokerSettings | None = None,
    share_group: str = "hub",
    offline_after_s: float = 90.0,
    tick_s: float = 0.5,
) -> Iterator[RunningHub]:
    """The hub's app over its database; with ``broker`` also device traffic and the rollout
    controller (only a process that can tell devices anything runs rollouts). Everything it
    started stops when the block ends."""
    ctx = build_context(settings)
    link = ingest = controller = None
    try:
        if broker is not None:
            client_id = f"hub-{socket.gethostname()[:20]}-{uuid.uuid4().hex[:8]}"
            link, ingest = start_ingest(
                ctx, broker, client_id, group=share_group, offline_after_s=offline_after_s
            )
            holder = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
            controller = start_controller(ctx, holder, tick_s=tick_s)
        yield RunningHub(load_app(ctx), ctx.db.dialect)
    finally:
        if controller is not None:
            controller.stop()
        if link is not None and ingest is not None:
            link.close()
            ingest.stop()
            ctx.gateway.close()
        ctx.db.dispose()


@contextmanager
def _session(settings: HubSettings) -> Iterator[Session]:
    database = db.open_db(settings.database_url)
    try:
        with database.session() as s:
            yield s
    finally:
        database.dispose()


def create_token(settings: HubSettings, name: str, role: TokenRole, actor: str) -> NewTokenView:
    """A new token; its secret is in the answer only."""
    with _session(settings) as s:
        return tokens.create(s, name, role, actor)


def list_tokens(settings: HubSettings) -> list[TokenView]:
    with _session(settings) as s:
        return tokens.listing(s)


def revoke_token(settings: HubSettings, name: str, actor: str) -> TokenView:
    with _session(settings) as s:
        return tokens.revoke(s, name, actor)


def registered_devices(settings: HubSettings) -> list[str]:
    with _session(settings) as s:
        return list(s.scalars(select(Device.id)))


@contextmanager
def _store(settings: HubSettings) -> Iterator[tuple[db.Database, PieceStorage]]:
    database = db.open_db(settings.database_url)
    try:
        yield database, open_store(settings, database)
    finally:
        database.dispose()


def gc(settings: HubSettings, *, dry_run: bool = False) -> GcReport:
    """Remove the pieces no bundle and no open upload names, and encodings whose piece is gone."""
    with _store(settings) as (database, store):
        return piece_gc.collect(database, store, dry_run=dry_run)


def import_pieces(settings: HubSettings, folder: Path) -> ImportReport:
    """Copy the pieces of a folder store (e.g. DATA/pieces before ``--store database``) into the
    store ``settings`` name."""
    with _store(settings) as (_, store):
        return piece_gc.import_folder(folder, store)
