"""``edgectl hub``: run the cloud hub (``serve``), bring its schema up (``migrate``), make tokens.

These commands work on the hub's database directly (they are run where the hub runs); everything
an operator does from elsewhere goes through the HTTP API (``publish``, ``releases``, ``devices``).
"""

from __future__ import annotations

import getpass
import logging
from pathlib import Path
from typing import Any

import click

from edgectl.output import emit, output_option, render_table

log = logging.getLogger(__name__)

_db_opt = click.option(
    "--db", "db_url", default=None, help="Database URL [env EDGEGLM_HUB_DB; default sqlite in --data]."
)
_data_opt = click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Hub data directory: pieces, default SQLite file [env EDGEGLM_HUB_DATA; ./hub-data].",
)


def _settings(**flags: Any) -> Any:
    from cloud_hub.settings import HubSettings

    return HubSettings.from_env(**flags)


@click.group()
def hub() -> None:
    """The cloud hub: registry, inventory, rollouts, HTTP API."""


@hub.command("migrate")
@_db_opt
@_data_opt
@output_option
def migrate_cmd(db_url: str | None, data_dir: Path | None, output: str) -> None:
    """Create or upgrade the hub's database schema to this version's head."""
    from cloud_hub.db import migrate

    settings = _settings(db_url=db_url, data_dir=data_dir)
    before, after = migrate(settings.database_url)
    data = {"before": before, "after": after, "changed": before != after}
    emit(data, output, lambda d: f"schema: {d['before'] or 'empty'} -> {d['after']}")


@hub.command("serve")
@_db_opt
@_data_opt
@click.option("--listen", default=None, help="host:port for the HTTP API [127.0.0.1:8080].")
@click.option(
    "--trust",
    "trust",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Public key whose signed bundles may be published (repeatable) [env EDGEGLM_HUB_TRUST].",
)
@click.option("--migrate/--no-migrate", default=False, help="Run the migrations first.")
@click.option("--broker", default=None, metavar="HOST:PORT", help="MQTT broker for device traffic [none].")
@click.option("--mqtt-user", default=None, help="MQTT username (password from EDGEGLM_MQTT_PASSWORD).")
@click.option(
    "--mqtt-ca", type=click.Path(exists=True, dir_okay=False), default=None, help="CA file: MQTT over TLS."
)
@click.option(
    "--share-group", default="hub", show_default=True, help="Shared-subscription group of the replicas."
)
@click.option("--offline-after", type=click.FloatRange(1), default=90.0, show_default=True, help="Seconds.")
@click.option(
    "--tick", type=click.FloatRange(0.05, 60), default=0.5, show_default=True, help="Controller tick, s."
)
def serve_cmd(
    db_url: str | None,
    data_dir: Path | None,
    listen: str | None,
    trust: tuple[Path, ...],
    migrate: bool,
    broker: str | None,
    mqtt_user: str | None,
    mqtt_ca: str | None,
    share_group: str,
    offline_after: float,
    tick: float,
) -> None:
    """Serve the HTTP API until SIGTERM; with --broker also device traffic and the rollout controller."""
    import os
    import socket
    import uuid

    import uvicorn

    from cloud_hub.server import build_context, load_app, start_controller, start_ingest
    from edgeglm.mqtt import BrokerSettings

    host = port = None
    if listen:
        host, _, port_text = listen.rpartition(":")
        if not port_text.isdigit():
            from edgeglm.errors import UsageError

            raise UsageError("--listen", f"{listen!r}: write host:port")
        port = int(port_text)
    settings = _settings(db_url=db_url, data_dir=data_dir, trusted_keys=trust, host=host or None, port=port)
    if migrate:
        from cloud_hub.db import migrate as run_migrate

        run_migrate(settings.database_url)
    ctx = build_context(settings)
    link = ingest = None
    if broker:
        from edgeglm.errors import UsageError

        bhost, _, bport = broker.rpartition(":")
        if not bport.isdigit():
            raise UsageError("--broker", f"{broker!r}: write host:port")
        mqtt = BrokerSettings(
            host=bhost or "127.0.0.1",
            port=int(bport),
            username=mqtt_user,
            password=os.environ.get("EDGEGLM_MQTT_PASSWORD"),
            ca_file=mqtt_ca,
        )
        client_id = f"hub-{socket.gethostname()[:20]}-{uuid.uuid4().hex[:8]}"
        link, ingest = start_ingest(ctx, mqtt, client_id, group=share_group, offline_after_s=offline_after)
    holder = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    # only a process that can tell devices anything runs rollouts (an API-only replica cannot)
    controller = start_controller(ctx, holder, tick_s=tick) if link is not None else None
    click.echo(f"cloud hub on http://{settings.host}:{settings.port} ({ctx.db.dialect})", err=True)
    try:
        uvicorn.run(
            load_app(ctx), host=settings.host, port=settings.port, log_level="warning", access_log=False
        )
    finally:
        if controller is not None:
            controller.stop()
        if link is not None and ingest is not None:
            link.close()
            ingest.stop()
            ctx.gateway.close()
        ctx.db.dispose()


@hub.group("token")
def token() -> None:
    """API tokens (bearer) with a role: viewer, operator, admin."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True)
@_db_opt
@_data_opt
@output_option
def token_create(name: str, role: str, db_url: str | None, data_dir: Path | None, output: str) -> None:
    """Make a token; its secret is printed once and stored only as a hash."""
    from cloud_hub import audit
    from cloud_hub.auth import Role, create_token
    from cloud_hub.db import open_db

    db = open_db(_settings(db_url=db_url, data_dir=data_dir).database_url)
    actor = f"local:{getpass.getuser()}"
    try:
        with db.session() as s:
            row, secret = create_token(s, name, Role[role], actor)
            audit.record(s, actor, "token.create", f"token/{row.name}", after={"role": role})
    finally:
        db.dispose()
    data = {"name": name, "role": role, "token": secret}
    emit(data, output, lambda d: f"{d['token']}\n(token {d['name']!r}, role {d['role']}: shown only once)")


@token.command("list")
@_db_opt
@_data_opt
@output_option
def token_list(db_url: str | None, data_dir: Path | None, output: str) -> None:
    """Tokens by name and role (never their secrets)."""
    from sqlalchemy import select

    from cloud_hub.db import open_db
    from cloud_hub.models import ApiToken

    db = open_db(_settings(db_url=db_url, data_dir=data_dir).database_url)
    try:
        with db.session() as s:
            rows = [
                {
                    "name": t.name,
                    "role": t.role,
                    "prefix": t.prefix,
                    "created_at": t.created_at.isoformat(),
                    "revoked": t.revoked_at is not None,
                }
                for t in s.scalars(select(ApiToken).order_by(ApiToken.name))
            ]
    finally:
        db.dispose()
    emit(
        rows,
        output,
        lambda rs: render_table(
            ["NAME", "ROLE", "PREFIX", "CREATED", "REVOKED"],
            [[r["name"], r["role"], r["prefix"], r["created_at"], r["revoked"]] for r in rs],
        ),
    )


@token.command("revoke")
@click.argument("name")
@_db_opt
@_data_opt
def token_revoke(name: str, db_url: str | None, data_dir: Path | None) -> None:
    """Revoke a token at once (its requests get 401 from now on)."""
    from cloud_hub import audit
    from cloud_hub.auth import revoke_token
    from cloud_hub.db import open_db

    db = open_db(_settings(db_url=db_url, data_dir=data_dir).database_url)
    actor = f"local:{getpass.getuser()}"
    try:
        with db.session() as s:
            revoke_token(s, name)
            audit.record(s, actor, "token.revoke", f"token/{name}", {"revoked": False}, {"revoked": True})
    finally:
        db.dispose()
    click.echo(f"token {name!r} revoked")


@hub.command("acl")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory.")
@click.option(
    "--device", "device_ids", multiple=True, help="A device id (repeatable) besides the registered."
)
@click.option("--hub-user", "hub_users", multiple=True, default=("hub",), show_default=True)
@click.option("--registered/--no-registered", default=True, help="Include every device in the database.")
@_db_opt
@_data_opt
@output_option
def acl_cmd(
    out: Path,
    device_ids: tuple[str, ...],
    hub_users: tuple[str, ...],
    registered: bool,
    db_url: str | None,
    data_dir: Path | None,
    output: str,
) -> None:
    """Write a mosquitto password file and ACL: each device may use only its own topics.

    Point mosquitto at them (password_file OUT/passwd, acl_file OUT/acl); OUT/credentials.json
    (0600) holds the generated passwords to provision the boxes with.
    """
    from cloud_hub.broker_acl import write_acl

    devices = list(device_ids)
    if registered:
        from sqlalchemy import select

        from cloud_hub.db import open_db
        from cloud_hub.models import Device

        db = open_db(_settings(db_url=db_url, data_dir=data_dir).database_url)
        try:
            with db.session() as s:
                devices += list(s.scalars(select(Device.id)))
        finally:
            db.dispose()
    counts = write_acl(out, devices, hub_users)
    emit(
        {**counts, "out": str(out)},
        output,
        lambda d: (
            f"{d['devices']} device(s), {d['hub_users']} hub user(s), {d['new_users']} new -> {d['out']}"
        ),
    )
