"""What every request of a hub process shares: its database, piece store, trusted keys, metrics, MQTT.

``cloud_hub.server.build_context`` makes one from the settings; the app keeps it as
``app.state.ctx`` and each route takes it as a dependency (``cloud_hub.routes.deps.Hub``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloud_hub.db import Database
from cloud_hub.desired import FleetKey
from cloud_hub.encoder import PieceEncoder
from cloud_hub.fetch_limit import FetchLimits
from cloud_hub.metrics import HubMetrics
from cloud_hub.piece_storage import PieceStorage
from cloud_hub.rollouts import Publish

__all__ = ["HubContext"]


@dataclass
class HubContext:
    db: Database
    store: PieceStorage  # the folder or the database backend (cloud_hub.piece_storage)
    trusted: dict[str, Any]
    metrics: HubMetrics
    max_piece_bytes: int = 64 * 1024 * 1024
    publish: Publish | None = None  # MQTT publish (topic, payload, qos, retain), when a broker is set
    gateway: Any = None  # the MQTT gateway (cloud_hub.gateway.Gateway), when a broker is set
    fleet: FleetKey | None = None  # signs desired states (cloud_hub.desired)
    fetch_limits: FetchLimits | None = None  # each device's fetch rate at the gateway (defaults if None)
    encoder: PieceEncoder | None = None  # plans and encodes pieces for devices (made on first use)
    public_url: str | None = None  # where browsers reach the hub: the dashboard's forms' Origin

    def piece_encoder(self) -> PieceEncoder:
        if self.encoder is None:
            self.encoder = PieceEncoder(self.db, self.store, self.metrics)
        return self.encoder
