"""The hub's MQTT gateway: a device fetches a manifest and pieces (tensor deltas) over mosquitto."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeglm.protocol import (
    DELTA_ENCODINGS,
    ErrorBody,
    FetchRequest,
    Frame,
    FrameAssembler,
    FrameKind,
    data_topic,
    decode,
    encode,
    fetch_topic,
)
from tests.hub_desired import desire_in_hub
from tests.integration.test_hub_rollouts import register
from tests.tensor_bundles import tensor_bundle

pytestmark = pytest.mark.integration

SHAPE = (256, 512)  # 512 KiB of float32 per tensor


def _tensor_bundle(root: Path, key: Any, version: str, fine_tune: float) -> Path:
    return tensor_bundle(root, key, version, fine_tune, shape=SHAPE)


class Device:
    """A paho client that sends FetchRequests and collects the frames answering each one."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.frames: dict[bytes, list[Frame]] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(data_topic(device_id), qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, _c, _u, msg) -> None:
        corr = getattr(msg.properties, "CorrelationData", b"")
        with self.lock:
            self.frames.setdefault(corr, []).append(Frame.unpack(msg.payload))

    def ask(self, **fields: Any) -> bytes:
        rid = uuid.uuid4().hex[:16]
        req = FetchRequest(
            device_id=self.device_id, request_id=rid, model="glm-tiny", profile="cpu-x86-int4", **fields
        )
        self.client.publish(fetch_topic(self.device_id), encode(req), qos=1)
        return rid.encode()

    def raw(self, payload: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        self.client.publish(fetch_topic(self.device_id), payload, qos=1, properties=props)

    def wait(self, rid: bytes, pieces: int, timeout: float = 20.0) -> dict[bytes, bytes | Frame]:
        """piece id -> the whole encoded payload, or its ERROR frame."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                frames = list(self.frames.get(rid, []))
            done: dict[bytes, Any] = {}
            assemblers: dict[bytes, FrameAssembler] = {}
            for f in frames:
                if f.kind == FrameKind.ERROR:
                    done[f.piece_id] = f
                    continue
                whole = assemblers.setdefault(f.piece_id, FrameAssembler()).add(f)
                if whole is not None:
                    done[f.piece_id] = (f, whole)
            if len(done) >= pieces:
                return done
            assert time.monotonic() < deadline, f"{len(done)} of {pieces} answers"
            time.sleep(0.05)


def test_a_device_fetches_the_manifest_and_deltas_for_what_it_lacks(
    hub_db_url: str, private_broker: int, publisher: Any, tmp_path: Path
) -> None:
    from cloud_hub.models import Device as DeviceRow
    from cloud_hub.server import build_context, start_ingest
    from cloud_hub.settings import HubSettings
    from edgeglm.bundle import load_manifest, parse_manifest
    from edgeglm.keys import load_public_keys
    from edgeglm.mqtt import BrokerSettings
    from edgeglm.piece_store import PieceStore
    from edgeglm.planner import receive
    from edgeglm.tensor_delta import Encoded

    old = _tensor_bundle(tmp_path / "b", publisher.key, "1.0.0", 0.0)
    new = _tensor_bundle(tmp_path / "b", publisher.key, "1.1.0", 1e-3)
    ctx = build_context(
        HubSettings(data_dir=tmp_path / "hub", db_url=hub_db_url, trusted_keys=(publisher.public_path,))
    )
    register(ctx, old)
    register(ctx, new)
    link, ingest = start_ingest(ctx, BrokerSettings(port=private_broker), "hub-gw")
    desire_in_hub(ctx, "box-1", "glm-tiny", "1.1.0", profile="cpu-x86-int4")  # what the hub targets
    dev = Device(private_broker, "box-1")
    try:
        # the device holds 1.0.0 in its own store
        store = PieceStore(tmp_path / "device")
        m_old, _ = load_manifest(old, None)
        from edgeglm.bundle_files import ingest_folder

        ingest_folder(old, m_old, store)

        rid = dev.ask(kind="manifest", version="1.1.0")
        answer = dev.wait(rid, 1)
        ((frame, raw),) = answer.values()
        assert frame.kind == FrameKind.MANIFEST
        trusted = dict(load_public_keys([publisher.public_path]))
        manifest, _ = parse_manifest(raw, trusted)  # exactly as signed: the signature verifies
        assert raw == (new / "manifest.json").read_bytes()

        lacking = sorted(manifest.piece_ids() - set(store.ids()))
        sizes = {pid: size for f in manifest.files for pid, size in f.pieces}
        assert 0 < len(lacking) < len(manifest.piece_ids())  # tensor b and the tokenizer are held
        # 1.0.0 was never given to box-1 nor reported by it: no delta base (a delta is invertible)
        rid = dev.ask(kind="pieces", version="1.1.0", have=("1.0.0",), pieces=tuple(lacking))
        got = dev.wait(rid, len(lacking))
        assert all(got[bytes.fromhex(pid)][0].encoding not in DELTA_ENCODINGS for pid in lacking)
        assert ctx.metrics.value("edgeglm_hub_have_dropped_total", transport="mqtt") == 1
        with ctx.db.session() as s:  # as its heartbeat reports it
            s.get(DeviceRow, "box-1").current_model, s.get(DeviceRow, "box-1").current_version = (
                "glm-tiny",
                "1.0.0",
            )
        rid = dev.ask(kind="pieces", version="1.1.0", have=("1.0.0",), pieces=tuple(lacking))
        got = dev.wait(rid, len(lacking))
        sent = 0
        for pid in lacking:
            frame, payload = got[bytes.fromhex(pid)]
            assert frame.encoding in DELTA_ENCODINGS  # the fine-tuned tensor travels as a delta
            base = frame.base_id.hex() if frame.base_id else None
            receive(store, pid, sizes[pid], Encoded(frame.encoding, frame.element_width, payload), base)
            sent += len(payload)
        assert store.has(lacking[0]) and sent < 0.9 * sum(sizes[p] for p in lacking)

        # a second device on the same move: the encodings come from the cache
        hits = ctx.metrics.value("edgeglm_hub_encode_cache_total", result="hit")
        rid = dev.ask(kind="pieces", version="1.1.0", have=("1.0.0",), pieces=tuple(lacking))
        dev.wait(rid, len(lacking))
        assert ctx.metrics.value("edgeglm_hub_encode_cache_total", result="hit") >= hits + len(lacking)

        # bad requests: an error frame, or a logged drop, and the gateway keeps answering
        rid = dev.ask(kind="pieces", version="1.1.0", pieces=("ab" * 32,))
        (err,) = dev.wait(rid, 1).values()
        assert err.kind == FrameKind.ERROR and decode(ErrorBody, err.payload).code == "not_found"
        rid = dev.ask(kind="manifest", version="9.9.9")  # never targeted at the device
        (err,) = dev.wait(rid, 1).values()
        assert decode(ErrorBody, err.payload).code == "forbidden"
        rid = dev.ask(kind="manifest", version="1.0.0")  # published, but not this device's target
        (err,) = dev.wait(rid, 1).values()
        assert decode(ErrorBody, err.payload).code == "forbidden"
        assert ctx.metrics.value("edgeglm_hub_device_messages_dropped_total", reason="forbidden") >= 2
        for junk in (b"{", b'{"kind": "pieces"}', b"\xff" * 100):
            dev.raw(junk)
        rid = dev.ask(kind="manifest", version="1.1.0")
        assert len(dev.wait(rid, 1)) == 1
        assert ctx.metrics.value("edgeglm_hub_device_messages_dropped_total", reason="malformed") >= 3
    finally:
        dev.client.loop_stop()
        link.close()
        ingest.stop()
        ctx.gateway.close()
        ctx.db.dispose()
