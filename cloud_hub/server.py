"""Assembling a hub process from its settings: database, piece store, trusted keys, the app."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from cloud_hub.api import HubContext, create_app
from cloud_hub.db import open_db
from cloud_hub.metrics import HubMetrics
from cloud_hub.settings import HubSettings
from edgeglm.keys import load_public_keys
from edgeglm.piece_store import PieceStore

__all__ = ["build_context", "load_app"]

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
