"""An agent updates over the real hub gateway and mosquitto: tensor deltas in, revert for free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.hub_desired import desire_in_hub
from tests.integration.test_hub_gateway import _tensor_bundle
from tests.integration.test_hub_rollouts import register

pytestmark = pytest.mark.integration


def test_update_over_mqtt_then_revert_without_download(
    hub_db_url: str, private_broker: int, publisher: Any, tmp_path: Path
) -> None:
    from cloud_hub.server import build_context, start_ingest
    from cloud_hub.settings import HubSettings
    from edge_agent.fetch import MqttFetcher
    from edge_agent.update.machine import UpdateMachine
    from edge_agent.update.slots import Slots
    from edge_agent.update.state import StateStore
    from edgeglm.assembler import assemble_bundle
    from edgeglm.bundle import load_manifest, manifest_digest
    from edgeglm.bundle_files import ingest_folder
    from edgeglm.keys import load_public_keys
    from edgeglm.mqtt import BrokerSettings, MqttLink
    from edgeglm.piece_store import PieceStore

    old = _tensor_bundle(tmp_path / "b", publisher.key, "1.0.0", 0.0)
    new = _tensor_bundle(tmp_path / "b", publisher.key, "1.1.0", 1e-3)
    ctx = build_context(
        HubSettings(data_dir=tmp_path / "hub", db_url=hub_db_url, trusted_keys=(publisher.public_path,))
    )
    register(ctx, old)
    register(ctx, new)
    link, ingest = start_ingest(ctx, BrokerSettings(port=private_broker), "hub-ota")
    desire_in_hub(ctx, "box-ota", "glm-tiny", "1.1.0", profile="cpu-x86-int4")  # the hub targets it

    root = tmp_path / "agent"
    slots = Slots(root / "slots")
    store = PieceStore(root / "pieces")
    m_old, doc_old = load_manifest(old, None)
    ingest_folder(old, m_old, store)
    assemble_bundle(m_old, doc_old, store, slots.clear("b"))
    slots.switch("b")
    trusted = dict(load_public_keys([publisher.public_path]))
    reports: list[tuple[str, bool]] = []
    agent_link = MqttLink(BrokerSettings(port=private_broker), "box-ota").connect()
    fetcher = MqttFetcher(agent_link, "box-ota", timeout_s=10)
    try:
        machine = UpdateMachine(
            StateStore(root / "agent.db"),
            store,
            slots,
            fetcher,
            trusted,
            lambda folder: load_manifest(folder, trusted),
            lambda step, ok, _r, _p: reports.append((step, ok)),
        )
        digest = manifest_digest(load_manifest(new, None)[1])
        sent_before = ctx.metrics.value("edgeglm_hub_data_bytes_sent_total")
        assert (
            machine.start(
                model="glm-tiny", version="1.1.0", profile="cpu-x86-int4", digest=digest, rollout_id=1
            )
            == "committed"
        )
        assert load_manifest(slots.active, trusted)[0].version == "1.1.0"
        wire = ctx.metrics.value("edgeglm_hub_data_bytes_sent_total") - sent_before
        old_ids = m_old.piece_ids()
        changed = sum(
            size for f in load_manifest(new, None)[0].files for p, size in f.pieces if p not in old_ids
        )
        assert 0 < wire < changed  # deltas: less than the changed pieces themselves
        assert machine.fetched and len(machine.fetched) == len(set(machine.fetched))

        fetched = len(machine.fetched)
        back = manifest_digest(doc_old)
        assert (
            machine.start(
                model="glm-tiny", version="1.0.0", profile="cpu-x86-int4", digest=back, rollout_id=2
            )
            == "committed"
        )
        assert len(machine.fetched) == fetched  # the revert fetched nothing
        assert load_manifest(slots.active, trusted)[0].version == "1.0.0"
        assert ("committed", True) in reports
    finally:
        agent_link.close()
        link.close()
        ingest.stop()
        ctx.gateway.close()
        ctx.db.dispose()
