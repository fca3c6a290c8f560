"""The hub's settings, built once in the entrypoint (flags > env > defaults) and passed down.

EDGEGLM_HUB_DB          database URL               sqlite:///<data>/hub.db
EDGEGLM_HUB_DATA        data directory (pieces)    ./hub-data
EDGEGLM_HUB_TRUST       trusted publisher keys      (comma-separated .pub paths)
EDGEGLM_HUB_LISTEN      HTTP host:port              127.0.0.1:8080
EDGEGLM_HUB_FLEET_KEY   the fleet key (private)     <data>/fleet.key, created at first start
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HubSettings"]


@dataclass(frozen=True)
class HubSettings:
    data_dir: Path = Path("hub-data")
    db_url: str = ""
    trusted_keys: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    max_piece_bytes: int = 64 * 1024 * 1024
    fleet_key: Path | None = None  # signs desired states; every replica of a hub uses the same

    @property
    def fleet_key_path(self) -> Path:
        return self.fleet_key or self.data_dir / "fleet.key"

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'hub.db').resolve()}"

    @property
    def pieces_dir(self) -> Path:
        return self.data_dir / "pieces"

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
        if env.get("EDGEGLM_HUB_FLEET_KEY"):
            values["fleet_key"] = Path(env["EDGEGLM_HUB_FLEET_KEY"])
        if env.get("EDGEGLM_HUB_LISTEN"):
            host, _, port = env["EDGEGLM_HUB_LISTEN"].rpartition(":")
            values["host"], values["port"] = host or "127.0.0.1", int(port)
        values.update({k: v for k, v in flags.items() if v is not None and v != ()})
        return cls(**values)  # type: ignore[arg-type]
