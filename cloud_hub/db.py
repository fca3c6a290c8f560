"""Connecting to the hub's database and bringing its schema up to date (Alembic owns it).

    sqlite:///path/hub.db      default; WAL journal, foreign keys on, busy timeout 10 s
    postgresql+psycopg://...   production (``postgresql://`` is taken to mean psycopg 3)

``migrate(url)`` runs the migrations under ``cloud_hub/migrations`` to head; ``open_db(url)``
refuses a database that is not at head, so a hub never runs against a schema it does not know.
Sessions come from :class:`Database` (``with db.session() as s:`` commits or rolls back).

On PostgreSQL the role that runs the migrations owns the tables, and an owner can drop the audit
log's triggers; ``grant_hub_role(url, role)`` (run as the owner) gives the role the hub serves as
what it needs and no more: reads and writes, but only SELECT and INSERT on ``audit_log`` and
SELECT on ``alembic_version`` (:func:`hub_role_grants` is the SQL, also in docs/hub-production.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from edgeglm.errors import ConfigError, UnavailableError, UsageError

__all__ = [
    "Database",
    "current_revision",
    "grant_hub_role",
    "head_revision",
    "hub_role_grants",
    "migrate",
    "normalise_url",
    "open_db",
]

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3; a bare path means a SQLite file."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError("database URL", f"{url!r} is not a database URL") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError("database URL", f"backend {parsed.get_backend_name()!r}: use sqlite or postgresql")
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(url: str, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the database at ``url`` to ``revision``; returns (before, after) revisions."""
    from alembic import command

    engine = make_engine(url)
    try:
        before = _current(engine, url)
        cfg = _alembic_config(url)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        after = current_revision(engine)
    finally:
        engine.dispose()
    log.info("database %s migrated %s -> %s", _safe(url), before, after)
    return before, after or ""


def hub_role_grants(role: str, schema: str) -> list[str]:
    """The SQL that lets ``role`` (quoted identifiers) serve the hub without owning anything."""
    return [
        f"GRANT USAGE ON SCHEMA {schema} TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
        f"REVOKE ALL ON {schema}.audit_log FROM {role}",
        f"GRANT SELECT, INSERT ON {schema}.audit_log TO {role}",
        f"REVOKE ALL ON {schema}.alembic_version FROM {role}",
        f"GRANT SELECT ON {schema}.alembic_version TO {role}",
        # tables a later migration adds (made by the same owner) are the hub's to read and write
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema}"
        f" GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {role}",
    ]


def grant_hub_role(url: str, role: str) -> str:
    """Run :func:`hub_role_grants` for ``role`` on the schema of ``url`` (connect as the owner, after
    ``migrate``); answers the schema's name. Only PostgreSQL has roles."""
    engine = make_engine(url)
    try:
        if engine.dialect.name != "postgresql":
            raise UsageError("grant-role", "only PostgreSQL has roles; a SQLite hub is one file and one user")
        with engine.begin() as conn:
            schema, me = conn.execute(text("SELECT current_schema(), current_user")).one()
            owner = conn.scalar(
                text("SELECT tableowner FROM pg_tables WHERE schemaname = :s AND tablename = 'audit_log'"),
                {"s": schema},
            )
            if owner is None:
                raise ConfigError(
                    f"schema {schema}", "has no audit_log", hint="Run 'edgectl hub migrate' first."
                )
            if role in (owner, me):
                raise UsageError(
                    "grant-role",
                    f"{role!r} owns the tables (or is connecting): the hub must serve as another role",
                )
            if conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}) is None:
                raise ConfigError(
                    f"role {role}",
                    "does not exist",
                    hint=f"Create it first: CREATE ROLE {role} LOGIN PASSWORD '...'",
                )
            # A superuser, or a member of the owner's role, could still drop the audit triggers.
            too_strong = conn.execute(
                text("SELECT rolsuper, pg_has_role(:r, :o, 'MEMBER') FROM pg_roles WHERE rolname = :r"),
                {"r": role, "o": owner},
            ).one()
            if any(too_strong):
                raise UsageError(
                    "grant-role",
                    f"{role!r} is a superuser or a member of the owner role {owner!r}: it could still"
                    " drop the audit log's triggers",
                    hint="Serve the hub as a plain LOGIN role that owns nothing and inherits no owner.",
                )
            quote = engine.dialect.identifier_preparer.quote
            for statement in hub_role_grants(quote(role), quote(schema)):
                conn.exec_driver_sql(statement)  # identifiers quoted above; ':' is not a bind here
    finally:
        engine.dispose()
    log.info("role %s may serve the hub on %s (schema %s)", role, _safe(url), schema)
    return str(schema)


def _safe(url: str) -> str:
    """The URL without its password, for logs and errors."""
    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable url>"


def _current(engine: Engine, url: str) -> str | None:
    try:
        return current_revision(engine)
    except OperationalError as exc:
        raise UnavailableError(f"database {_safe(url)}", str(exc.orig).strip().splitlines()[0]) from exc


class Database:
    """An engine plus a session factory; ``session()`` is one transaction."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.dialect = engine.dialect.name
        self._factory = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._factory() as s, s.begin():
            yield s

    def ping(self) -> None:
        """One round trip; a database that cannot answer raises (the API answers 503)."""
        with self.session() as s:
            s.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    def tables(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())


def open_db(url: str) -> Database:
    """A database at the head revision, or :class:`ConfigError` saying to run ``edgectl hub migrate``."""
    engine = make_engine(url)
    current = _current(engine, url)
    head = head_revision()
    if current != head:
        engine.dispose()
        raise ConfigError(
            f"database {_safe(url)}",
            f"schema is at {current or 'nothing'}, this hub needs {head}",
            hint="Run 'edgectl hub migrate --db URL' first.",
        )
    return Database(engine, normalise_url(url))
