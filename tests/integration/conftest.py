"""Fixtures for the cloud hub's integration tests: a fresh database on SQLite *and* PostgreSQL.

Every test that takes ``hub_db_url`` runs twice: on a SQLite file and on the real PostgreSQL at
127.0.0.1:5432 (database ``test``), each in a schema of its own that the migrations build and
the fixture drops afterwards. ``signed_bundle`` writes small signed bundles of real files.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
            return None
    except Exception as exc:  # the reason goes into the skip message
        return str(exc).splitlines()[0]


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty hub database URL."""
    from cloud_hub.db import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'hub.db'}"
        migrate(url)
        yield url
        return
    why = _pg_reachable()
    if why:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required for the hub suite: {why}")
    import sqlalchemy as sa

    schema = f"hub_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_ADMIN}?options=-csearch_path%3D{schema}"
    try:
        migrate(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@dataclass
class Publisher:
    """A signing key and the bundles made with it."""

    root: Path
    key: Any
    public_path: Path
    key_id: str

    def bundle(
        self,
        version: str,
        *,
        model: str = "glm-tiny",
        profile: str = "cpu-x86-int4",
        passed: bool | None = True,
        seed: int = 0,
        size: int = 200_000,
    ) -> Path:
        from edgeglm.bundle_files import seal_folder

        folder = self.root / f"{model}-{version}-{profile}-{seed}-{passed}"
        folder.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        (folder / "weights.bin").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
        quality: dict[str, Any] = {}
        if passed is not None:
            quality = {"passed": passed, "failures": [] if passed else ["greedy_prefix_agreement 0.31 < 0.5"]}
        seal_folder(folder, self.key, model=model, version=version, profile=profile, quality=quality)
        return folder


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    from edgeglm.keys import create_keypair, key_id, load_private_key

    priv, pub, kid = create_keypair(tmp_path / "keys", "release")
    key = load_private_key(priv)
    assert key_id(key.public_key()) == kid
    return Publisher(tmp_path / "bundles", key, pub, kid)


@dataclass
class Hub:
    """A hub app on a real database, with one token per role."""

    client: Any
    ctx: Any
    tokens: dict[str, str]

    def as_(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@pytest.fixture
def hub(hub_db_url: str, tmp_path: Path, publisher: Publisher) -> Iterator[Hub]:
    from fastapi.testclient import TestClient

    from cloud_hub.auth import Role, create_token
    from cloud_hub.server import build_context, load_app
    from cloud_hub.settings import HubSettings

    settings = HubSettings(
        data_dir=tmp_path / "hub", db_url=hub_db_url, trusted_keys=(publisher.public_path,)
    )
    ctx = build_context(settings)
    tokens = {}
    with ctx.db.session() as s:
        for role in Role:
            _, tokens[role.name] = create_token(s, f"{role.name}-token", role, "test-setup")
    with TestClient(load_app(ctx)) as client:
        yield Hub(client, ctx, tokens)
    ctx.db.dispose()


PublishFn = Callable[..., dict[str, Any]]


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[int]:
    """A mosquitto of our own on a free loopback port (no other test's traffic), stopped by PID."""
    from edgectl.demo.procs import ManagedBroker

    broker = ManagedBroker(tmp_path / "broker").start()
    try:
        yield broker.port
    finally:
        broker.stop()
