"""The agent wing's facade: all the composition root (``edgectl agent``, ``edge-agent``) asks of it.

    load_config(path)        the daemon's config: ``path``, else $EDGE_AGENT_CONFIG, else
                             /etc/edge-agent/agent.toml, else the environment alone
    load_engine(bundle, ...) an engine for one bundle (``agent infer``)
    serve_bundle(bundle,...) ``agent serve``: one bundle on the serving stack until SIGINT/SIGTERM
    run_daemon(config)       ``agent run``: logging set up, the daemon until SIGTERM
    box_status(config)       ``agent status``: the slots and the last update, as a dict
    last_update(data_dir)    the update's last recorded step (the tests' and benchmarks' harness)
    active_manifest(data_dir) the active slot's manifest

Each function imports what it needs when called: importing this module loads no engine, so
``agent status`` stays light and ``import edgectl`` imports no wing at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.inference.engine import Engine
    from edgeglm.bundle import Manifest
    from edgeglm.mqtt import BrokerSettings
    from edgeglm.profiles import DeviceProfile

__all__ = [
    "active_manifest",
    "box_status",
    "last_update",
    "load_config",
    "load_engine",
    "run_daemon",
    "serve_bundle",
]

_CONFIG_ENV = "EDGE_AGENT_CONFIG"


def load_config(path: Path | None) -> AgentConfig:
    import os

    from edge_agent.config import DEFAULT_PATH
    from edge_agent.config import load_config as load

    found = path or Path(os.environ.get(_CONFIG_ENV, DEFAULT_PATH))
    if path is None and not found.exists() and "EDGE_AGENT_DEVICE_ID" in os.environ:
        return load(None)  # configured by the environment alone
    return load(found)


def load_engine(bundle: Path, *, profile: DeviceProfile | None, trusted: dict[str, Any] | None) -> Engine:
    from edge_agent.inference.engine import Engine

    return Engine.load(bundle, profile=profile, trusted=trusted)


def serve_bundle(
    bundle: Path,
    *,
    device_id: str,
    broker: BrokerSettings | None,
    site: str | None = None,
    http: tuple[str, int] | None = None,
    profile: DeviceProfile | None = None,
    trusted: dict[str, Any] | None = None,
    insecure_unsigned: bool = False,
    queue_size: int | None = None,
    http_token_file: Path | None = None,
    http_allow_remote: bool = False,
    http_max_concurrency: int | None = None,
) -> None:
    """Serve ``bundle`` on MQTT (``broker``; None: none) and HTTP (``http``) until interrupted.

    ``trusted`` (the release keys) verifies the bundle; without them the bundle is served
    unverified only when ``insecure_unsigned`` says so, else :class:`UsageError`; with keys,
    ``insecure_unsigned`` is ignored (the CLI refuses the two together).
    """
    from edge_agent.config import read_token
    from edge_agent.http_api import DEFAULT_MAX_CONCURRENCY
    from edge_agent.server import Server, ServeSettings
    from edgeglm.errors import UsageError

    if trusted is None and not insecure_unsigned:
        raise UsageError(
            "--trust",
            "give the release key BUNDLE must be signed with; it is not verified without one",
            hint="Add --trust KEY.pub, or --insecure-unsigned to serve an unverified bundle anyway.",
        )
    token = None if http_token_file is None else read_token(http_token_file, "--http-token-file")
    settings = ServeSettings(
        bundle=bundle,
        device_id=device_id,
        broker=broker,
        site=site,
        http_host=None if http is None else http[0],
        http_port=0 if http is None else http[1],
        profile=profile,
        trusted=trusted,
        queue_size=queue_size,
        http_token=token,
        http_allow_remote=http_allow_remote,
        http_max_concurrency=http_max_concurrency or DEFAULT_MAX_CONCURRENCY,
    )
    Server(settings).run_forever()


def run_daemon(config: AgentConfig) -> None:
    from edge_agent.daemon import Agent
    from edge_agent.logs import setup_logging

    setup_logging(config.log_format, config.log_level)
    Agent(config).run_forever()


def last_update(data_dir: Path) -> Any:
    """The update's last recorded step in a box's data folder (``None`` before its first update)."""
    from edge_agent.update.state import StateStore

    if not (data_dir / "agent.db").exists():
        return None
    store = StateStore(data_dir / "agent.db")
    try:
        return store.latest()
    finally:
        store.close()


def active_manifest(data_dir: Path) -> Manifest | None:
    """The manifest of the bundle in a box's active slot (``None`` while it has none)."""
    from edge_agent.update.slots import Slots

    slots = Slots(data_dir)
    return slots.manifest(slots.active_name())


def box_status(config: AgentConfig) -> dict[str, Any]:
    """What the box holds: device id, active slot, each slot's model@version, the last update.

    ``active_slot`` is None while the box serves nothing: no slot is active yet (an empty box,
    whose data folder this leaves untouched) or the active one holds no model.
    """
    from edge_agent.update.slots import Slots

    data = Path(config.data_dir)
    rows: dict[str, Any] = {"device_id": config.device_id, "active_slot": None}
    if not (data / "current").is_symlink():  # no agent has set this box up: read only, create nothing
        rows.update(slot_a=None, slot_b=None)
    else:
        slots = Slots(data)
        for name in ("a", "b"):
            m = slots.manifest(name)
            rows[f"slot_{name}"] = f"{m.model}@{m.version}" if m is not None else None
        active = slots.active_name()
        rows["active_slot"] = active if rows[f"slot_{active}"] is not None else None
    last = last_update(data)
    rows["last_update"] = (
        None
        if last is None
        else {
            "target": f"{last.model}@{last.version}",
            "rollout_id": None if last.rollout_id is None else str(last.rollout_id),  # its wire form
            "step": last.step,
            "reason": last.reason or None,
            "updated_at": last.updated_at,
        }
    )
    return rows
