"""The migrations build what the models say, and a name the contract cannot carry stops an upgrade
with a message naming it (both databases)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from cloud_hub.db import _alembic_config, head_revision, make_engine, migrate
from cloud_hub.models import Base
from edgeglm.contracts import NAME_MAX

pytestmark = pytest.mark.integration


def test_the_migrated_schema_is_the_models_schema(hub_db_url: str) -> None:
    engine = make_engine(hub_db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": engine.dialect.name != "sqlite"})
            diffs = compare_metadata(ctx, Base.metadata)
        assert diffs == []
        names = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns("models")}
        if engine.dialect.name == "postgresql":
            assert names["name"].length == NAME_MAX
    finally:
        engine.dispose()


def test_a_name_longer_than_the_contract_stops_the_upgrade_by_name(hub_db_url: str) -> None:
    cfg = _alembic_config(hub_db_url)
    engine = make_engine(hub_db_url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
        long = "m" * 70
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO models (name, created_at) VALUES (:n, CURRENT_TIMESTAMP)"), {"n": long}
            )
        with pytest.raises(RuntimeError, match=r"models\.name = 'm{70}'") as err:
            migrate(hub_db_url)
        assert "Delete those rows" in str(err.value)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM models"))
        assert migrate(hub_db_url)[1] == head_revision()
    finally:
        engine.dispose()
