"""The hub's settings, built once in the entrypoint (flags > env > defaults) and passed down.

EDGEGLM_HUB_DB          database URL               sqlite:///<data>/hub.db
EDGEGLM_HUB_DATA        data directory             ./hub-data
EDGEGLM_HUB_STORE       piece store backend         auto: database on PostgreSQL, else DATA/pieces
EDGEGLM_HUB_TRUST       trusted publisher keys      (comma-separated .pub paths)
EDGEGLM_HUB_LISTEN      HTTP host:port              127.0.0.1:8080
EDGEGLM_HUB_FLEET_KEY   the fleet key (private)     <data>/fleet.key, created at first start
EDGEGLM_HUB_FETCH_RATE  fetch requests/s per device 20 (cloud_hub.fetch_limit)
EDGEGLM_HUB_FETCH_BURST fetch requests in a burst   200
EDGEGLM_HUB_FETCH_PENDING  a device's queued fetches  64
EDGEGLM_HUB_FETCH_BYTES_RATE  bytes/s sent per device 0 (no cap)
EDGEGLM_HUB_PIECES_URL  base URL devices fetch piece bytes from over HTTP (the hub as devices reach
                        it, or a proxy / CDN in front of it)      none: bytes over MQTT only
EDGEGLM_HUB_PUBLIC_URL  the address people's browsers reach the hub at, http(s)://HOST[:PORT]
                        (behind a proxy: the proxy's); the dashboard takes a form only from a
                        page of it (its Origin)                   none: the request's Host header
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cloud_hub.fetch_limit import FetchLimits
from cloud_hub.piece_storage import StoreKind
from edgeglm.contracts import PIECES_URL_MAX, PIECES_URL_PATTERN
from edgeglm.errors import ConfigError

__all__ = ["HubSettings", "public_origin"]


def public_origin(url: str) -> str | None:
    """The origin a browser sends for pages of ``url`` (``scheme://host[:port]``, lower case, the
    scheme's default port left out), or None when ``url`` is not ``http(s)://HOST[:PORT][/]``."""
    if len(url) > 256 or not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+/?", url.strip()):
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


_FETCH_ENV: tuple[tuple[str, str, type[float] | type[int]], ...] = (
    ("EDGEGLM_HUB_FETCH_RATE", "fetch_rate", float),
    ("EDGEGLM_HUB_FETCH_BURST", "fetch_burst", int),
    ("EDGEGLM_HUB_FETCH_PENDING", "fetch_pending", int),
    ("EDGEGLM_HUB_FETCH_BYTES_RATE", "fetch_bytes_rate", int),
)


@dataclass(frozen=True)
class HubSettings:
    data_dir: Path = Path("hub-data")
    db_url: str = ""
    trusted_keys: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    max_piece_bytes: int = 64 * 1024 * 1024
    fleet_key: Path | None = None  # signs desired states; every replica of a hub uses the same
    store: StoreKind = StoreKind.AUTO  # where the pieces are (cloud_hub.piece_storage)
    fetch_rate: float = FetchLimits.requests_per_s  # per device (cloud_hub.fetch_limit)
    fetch_burst: int = FetchLimits.burst
    fetch_pending: int = FetchLimits.pending
    fetch_bytes_rate: int = FetchLimits.bytes_per_s
    pieces_url: str | None = None  # desired states offer bytes over HTTP there (cloud_hub.routes.pieces)
    public_url: str | None = None  # where browsers reach the hub (cloud_hub.ui.access.same_origin)

    def __post_init__(self) -> None:
        if self.public_url is not None and public_origin(self.public_url) is None:
            raise ConfigError(
                "EDGEGLM_HUB_PUBLIC_URL",
                f"{self.public_url[:80]!r} is not http(s)://HOST[:PORT] (no path, query or user)",
                hint="Give the address people's browsers open the hub at, e.g. https://hub.example.com.",
            )
        url = self.pieces_url
        if url is not None and (len(url) > PIECES_URL_MAX or not re.fullmatch(PIECES_URL_PATTERN, url)):
            raise ConfigError(
                "--pieces-url",
                f"{url[:80]!r} is not http(s)://HOST[:PORT][/PATH] of at most {PIECES_URL_MAX} characters",
                hint="Give the address devices reach the hub (or its proxy / CDN) at, without query or user.",
            )

    @property
    def fetch_limits(self) -> FetchLimits:
        return FetchLimits(
            requests_per_s=self.fetch_rate,
            burst=self.fetch_burst,
            pending=self.fetch_pending,
            bytes_per_s=self.fetch_bytes_rate,
        )

    @property
    def fleet_key_path(self) -> Path:
        return self.fleet_key or self.data_dir / "fleet.key"

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'hub.db').resolve()}"

    @property
    def pieces_dir(self) -> Path:
        return self.data_dir / "pieces"

    def store_kind(self, dialect: str) -> StoreKind:
        """The backend ``store`` means on a database of ``dialect``: ``auto`` is the database on
        PostgreSQL (what replicas share), the folder on SQLite (one hub, one machine)."""
        if self.store is StoreKind.AUTO:
            return StoreKind.DATABASE if dialect == "postgresql" else StoreKind.FOLDER
        return self.store

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: object) -> HubSettings:
        """Defaults, overridden by ``EDGEGLM_HUB_*`` variables, overridden by non-None ``flags``."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if env.get("EDGEGLM_HUB_DATA"):
            values["data_dir"] = Path(env["EDGEGLM_HUB_DATA"])
        if env.get("EDGEGLM_HUB_DB"):
            values["db_url"] = env["EDGEGLM_HUB_DB"]
        if env.get("EDGEGLM_HUB_TRUST"):
            values["trusted_keys"] = tuple(Path(p) for p in env["EDGEGLM_HUB_TRUST"].split(",") if p)
        if env.get("EDGEGLM_HUB_STORE"):
            try:
                values["store"] = StoreKind(env["EDGEGLM_HUB_STORE"])
            except ValueError as exc:
                choices = ", ".join(k.value for k in StoreKind)
                raise ConfigError(
                    "EDGEGLM_HUB_STORE",
                    f"{env['EDGEGLM_HUB_STORE']!r} is not one of {choices}",
                    hint="Set it to auto, folder or database, or unset it (auto).",
                ) from exc
        if env.get("EDGEGLM_HUB_PIECES_URL"):
            values["pieces_url"] = env["EDGEGLM_HUB_PIECES_URL"]
        if env.get("EDGEGLM_HUB_PUBLIC_URL"):
            values["public_url"] = env["EDGEGLM_HUB_PUBLIC_URL"]
        if env.get("EDGEGLM_HUB_FLEET_KEY"):
            values["fleet_key"] = Path(env["EDGEGLM_HUB_FLEET_KEY"])
        for name, field, kind in _FETCH_ENV:
            if env.get(name):
                try:
                    values[field] = kind(env[name])
                except ValueError as exc:
                    raise ConfigError(name, f"{env[name]!r} is not a {kind.__name__}") from exc
        if env.get("EDGEGLM_HUB_LISTEN"):
            host, _, port = env["EDGEGLM_HUB_LISTEN"].rpartition(":")
            values["host"], values["port"] = host or "127.0.0.1", int(port)
        values.update({k: v for k, v in flags.items() if v is not None and v != ()})
        return cls(**values)  # type: ignore[arg-type]
