"""``edgectl hub``: run the cloud hub (``serve``), bring its schema up (``migrate``), make tokens,
collect its piece store's garbage (``gc``), move an old folder store into it (``store import``).

These commands work on the hub's database directly (they are run where the hub runs), through
the hub wing's facade :mod:`cloud_hub.admin`; everything an operator does from elsewhere goes
through the HTTP API (``publish``, ``releases``, ``devices``).
"""

from __future__ import annotations

import getpass
import logging
from pathlib import Path
from typing import Any

import click

from edgectl.output import emit, output_option, render_table
from edgeglm.errors import UsageError
from edgeglm.hub_api import TokenRole

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

_STORES = ("auto", "folder", "database")  # cloud_hub.piece_storage.StoreKind
_store_opt = click.option(
    "--store",
    type=click.Choice(_STORES),
    default=None,
    help="Where bundle pieces live: database (shared by every replica), folder (DATA/pieces), or"
    " auto: database on PostgreSQL, folder on SQLite [env EDGEGLM_HUB_STORE; auto].",
)


def _settings(**flags: Any) -> Any:
    from cloud_hub.admin import HubSettings

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
    from cloud_hub import admin

    before, after = admin.migrate(_settings(db_url=db_url, data_dir=data_dir))
    data = {"before": before, "after": after, "changed": before != after}
    emit(data, output, lambda d: f"schema: {d['before'] or 'empty'} -> {d['after']}")


@hub.command("grant-role")
@click.argument("role")
@_db_opt
@_data_opt
def grant_role_cmd(role: str, db_url: str | None, data_dir: Path | None) -> None:
    """PostgreSQL: let ROLE serve the hub without owning its tables (run as the owner, after migrate).

    ROLE may read and write the hub's tables, but only SELECT and INSERT on audit_log: it cannot
    change, truncate or drop the audit log's triggers. Serve the hub as ROLE, migrate as the owner.
    """
    from cloud_hub import admin

    schema = admin.grant_role(_settings(db_url=db_url, data_dir=data_dir), role)
    click.echo(f"role {role!r} may serve the hub on schema {schema!r}; serve it with --db as {role}")


@hub.command("serve")
@_db_opt
@_data_opt
@_store_opt
@click.option("--listen", default=None, help="host:port for the HTTP API [127.0.0.1:8080].")
@click.option(
    "--trust",
    "trust",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Public key whose signed bundles may be published (repeatable) [env EDGEGLM_HUB_TRUST].",
)
@click.option(
    "--fleet-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Private key that signs desired states; created if absent; the same on every replica"
    " [env EDGEGLM_HUB_FLEET_KEY; DATA/fleet.key].",
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
@click.option(
    "--fetch-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Fetch requests per second each device may send the gateway [env EDGEGLM_HUB_FETCH_RATE; 20].",
)
@click.option(
    "--fetch-burst",
    type=click.IntRange(1),
    default=None,
    help="Fetch requests a device may send at once before the rate applies"
    " [env EDGEGLM_HUB_FETCH_BURST; 200].",
)
@click.option(
    "--fetch-pending",
    type=click.IntRange(1),
    default=None,
    help="Fetch requests of one device queued at once [env EDGEGLM_HUB_FETCH_PENDING; 64].",
)
@click.option(
    "--fetch-bytes-rate",
    type=click.IntRange(0),
    default=None,
    help="Bytes per second the gateway sends each device, 0 for no cap"
    " [env EDGEGLM_HUB_FETCH_BYTES_RATE; 0].",
)
@click.option(
    "--pieces-url",
    default=None,
    metavar="URL",
    help="Base URL devices fetch piece bytes from over HTTP: this hub as devices reach it, or a proxy"
    " or CDN in front of it; desired states then carry it and a device token [env"
    " EDGEGLM_HUB_PIECES_URL; none: MQTT only].",
)
def serve_cmd(
    db_url: str | None,
    data_dir: Path | None,
    store: str | None,
    listen: str | None,
    trust: tuple[Path, ...],
    fleet_key: Path | None,
    migrate: bool,
    broker: str | None,
    mqtt_user: str | None,
    mqtt_ca: str | None,
    share_group: str,
    offline_after: float,
    tick: float,
    fetch_rate: float | None,
    fetch_burst: int | None,
    fetch_pending: int | None,
    fetch_bytes_rate: int | None,
    pieces_url: str | None,
) -> None:
    """Serve the HTTP API until SIGTERM; with --broker also device traffic and the rollout controller."""
    import os

    import uvicorn

    from cloud_hub import admin
    from edgeglm.mqtt import BrokerSettings

    for name in ("cloud_hub", "edgeglm"):  # a daemon says what it does: publishes, rollouts, reverts
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    host = port = None
    if listen:
        host, _, port_text = listen.rpartition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UsageError("--listen", f"{listen!r}: write host:port")
        port = int(port_text)
    settings = _settings(
        db_url=db_url,
        data_dir=data_dir,
        store=_store_kind(store),
        trusted_keys=trust,
        fleet_key=fleet_key,
        host=host or None,
        port=port,
        fetch_rate=fetch_rate,
        fetch_burst=fetch_burst,
        fetch_pending=fetch_pending,
        fetch_bytes_rate=fetch_bytes_rate,
        pieces_url=pieces_url,
    )
    sock = admin.listen(settings)  # before anything starts: a taken port is exit 78, not a URL
    if migrate:
        admin.migrate(settings)
    mqtt = None
    if broker:
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
    with (
        sock,
        admin.running(
            settings, broker=mqtt, share_group=share_group, offline_after_s=offline_after, tick_s=tick
        ) as served,
    ):
        click.echo(f"cloud hub on http://{settings.host}:{settings.port} ({served.dialect})", err=True)
        config = uvicorn.Config(served.app, log_level="warning", access_log=False)
        uvicorn.Server(config).run(sockets=[sock])


def _store_kind(store: str | None) -> Any:
    from cloud_hub.admin import StoreKind

    return None if store is None else StoreKind(store)


@hub.command("gc")
@_db_opt
@_data_opt
@_store_opt
@click.option("--dry-run", is_flag=True, help="Count what would go; remove nothing.")
@output_option
def gc_cmd(db_url: str | None, data_dir: Path | None, store: str | None, dry_run: bool, output: str) -> None:
    """Remove the pieces no published bundle and no open upload names, and the encodings whose
    piece or base is gone. Safe beside a running hub and a publish in progress; exits 1 when a
    publish adopted a piece while it was being removed (publish that bundle again)."""
    from dataclasses import asdict

    from cloud_hub import admin
    from edgeglm.errors import ConflictError

    report = admin.gc(_settings(db_url=db_url, data_dir=data_dir, store=_store_kind(store)), dry_run=dry_run)
    data = asdict(report)
    data["lost"] = list(report.lost)

    def text(d: dict[str, Any]) -> str:
        verb = "would remove" if d["dry_run"] else "removed"
        lines = [
            f"{d['store']}: {verb} {d['pieces_removed']} of {d['pieces_held']} pieces"
            f" ({d['bytes_removed']} bytes) and {d['encodings_removed']} of {d['encodings_held']} encodings"
        ]
        for name, count in d["incomplete"].items():
            lines.append(f"{name}: {count} piece(s) missing from the store; publish it again to repair it")
        return "\n".join(lines)

    emit(data, output, text)
    if report.lost:
        raise ConflictError(
            "gc",
            f"{len(report.lost)} removed piece(s) were adopted by a publish meanwhile",
            hint="Publish the bundles that name them again (edgectl publish); that repairs the store.",
        )


@hub.group("store")
def store_group() -> None:
    """The hub's piece store (folder or database)."""


@store_group.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_db_opt
@_data_opt
@_store_opt
@output_option
def store_import_cmd(
    folder: Path, db_url: str | None, data_dir: Path | None, store: str | None, output: str
) -> None:
    """Copy every piece of FOLDER (a folder store, e.g. DATA/pieces of a hub that ran with
    --store folder) into the configured store, each verified; then remove FOLDER yourself."""
    from dataclasses import asdict

    from cloud_hub import admin

    settings = _settings(db_url=db_url, data_dir=data_dir, store=_store_kind(store))
    report = admin.import_pieces(settings, folder)
    data = asdict(report)
    data["corrupt"] = list(report.corrupt)
    emit(
        data,
        output,
        lambda d: (
            f"{d['source']} -> {d['store']}: {d['copied']} piece(s) copied ({d['bytes_copied']} bytes),"
            f" {d['held_already']} held already, {len(d['corrupt'])} corrupt (left out)"
        ),
    )


@hub.group("token")
def token() -> None:
    """API tokens (bearer) with a role: viewer, operator, admin."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice([r.value for r in TokenRole]), required=True)
@_db_opt
@_data_opt
@output_option
def token_create(name: str, role: str, db_url: str | None, data_dir: Path | None, output: str) -> None:
    """Make a token; its secret is printed once and stored only as a hash."""
    from cloud_hub import admin

    settings = _settings(db_url=db_url, data_dir=data_dir)
    made = admin.create_token(settings, name, TokenRole(role), _local_actor())
    data = made.model_dump(mode="json", include={"name", "role", "token"})
    emit(data, output, lambda d: f"{d['token']}\n(token {d['name']!r}, role {d['role']}: shown only once)")


@token.command("list")
@_db_opt
@_data_opt
@output_option
def token_list(db_url: str | None, data_dir: Path | None, output: str) -> None:
    """Tokens by name and role (never their secrets)."""
    from cloud_hub import admin

    listed = admin.list_tokens(_settings(db_url=db_url, data_dir=data_dir))
    rows = [
        t.model_dump(mode="json", include={"name", "role", "prefix", "created_at", "revoked"}) for t in listed
    ]
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
    from cloud_hub import admin

    admin.revoke_token(_settings(db_url=db_url, data_dir=data_dir), name, _local_actor())
    click.echo(f"token {name!r} revoked")


def _local_actor() -> str:
    """Who the audit log records for a command run where the hub runs."""
    return f"local:{getpass.getuser()}"


class _Owner(click.ParamType):
    """``USER[:GROUP]`` or ``:GROUP`` -> (uid, gid), -1 for the one left as it is; GROUP defaults to
    USER's own group. Both must exist on this machine."""

    name = "USER[:GROUP]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import grp
        import pwd

        if isinstance(value, tuple):
            return value
        user, _, group = str(value).partition(":")
        if not user and not group:
            self.fail(f"{value!r}: write USER, USER:GROUP or :GROUP", param, ctx)
        uid = gid = -1
        if user:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                self.fail(f"no user {user!r} on this machine (mosquitto runs as 'mosquitto')", param, ctx)
            uid, gid = entry.pw_uid, entry.pw_gid
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                self.fail(f"no group {group!r} on this machine", param, ctx)
        return uid, gid


class _SiteMembers(click.ParamType):
    """``SITE=ID[,ID...]`` -> (site, (id, ...))."""

    name = "SITE=ID[,ID...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        site, sep, ids = str(value).partition("=")
        members = tuple(i for i in ids.split(",") if i)
        if not sep or not site or not members:
            self.fail(f"{value!r}: write SITE=DEVICE[,DEVICE...]", param, ctx)
        return site, members


@hub.command("acl")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory.")
@click.option(
    "--device", "device_ids", multiple=True, help="A device id (repeatable) besides the registered."
)
@click.option("--hub-user", "hub_users", multiple=True, default=("hub",), show_default=True)
@click.option(
    "--sensor",
    "sensors",
    multiple=True,
    help="A sensor's user name (repeatable): may ask any device or site, reads only sensors/NAME/#.",
)
@click.option(
    "--site",
    "sites",
    multiple=True,
    type=_SiteMembers(),
    help="Devices that serve a site's shared infer topic, as in their [serving] site (repeatable).",
)
@click.option(
    "--owner",
    type=_Owner(),
    default=None,
    help="Hand passwd and acl (0640) to the broker's user and group, e.g. mosquitto; :GROUP keeps"
    " the owner [default: the caller's, which a broker that drops privileges cannot read].",
)
@click.option("--registered/--no-registered", default=True, help="Include every device in the database.")
@_db_opt
@_data_opt
@output_option
def acl_cmd(
    out: Path,
    device_ids: tuple[str, ...],
    hub_users: tuple[str, ...],
    sensors: tuple[str, ...],
    sites: tuple[tuple[str, tuple[str, ...]], ...],
    owner: tuple[int, int] | None,
    registered: bool,
    db_url: str | None,
    data_dir: Path | None,
    output: str,
) -> None:
    """Write a mosquitto password file and ACL: each device may use only its own topics.

    Point mosquitto at them (password_file OUT/passwd, acl_file OUT/acl); OUT/credentials.json
    (0600) holds the generated passwords to provision the boxes and sensors with. mosquitto reads
    the files as its own user: give --owner mosquitto (docs/hub-production.md).
    """
    from cloud_hub import admin

    devices = list(device_ids)
    if registered:
        devices += admin.registered_devices(_settings(db_url=db_url, data_dir=data_dir))
    site_map: dict[str, list[str]] = {}
    for site, members in sites:
        site_map.setdefault(site, []).extend(members)
    counts = admin.write_acl(out, devices, hub_users, sensors=sensors, sites=site_map, owner=owner)
    emit(
        {**counts, "out": str(out)},
        output,
        lambda d: (
            f"{d['devices']} device(s), {d['sensors']} sensor(s), {d['hub_users']} hub user(s),"
            f" {d['new_users']} new -> {d['out']}"
        ),
    )
