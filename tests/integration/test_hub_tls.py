"""The hub on a TLS listener with credentials: device traffic arrives; bad credentials are refused."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from cloud_hub.broker_acl import write_acl
from edgectl.demo.procs import ManagedBroker, free_port
from edgeglm.errors import UnavailableError
from edgeglm.protocol import Health, Heartbeat, encode, heartbeat_topic

pytestmark = pytest.mark.integration


def _cert(subject: str, issuer_key: Any, issuer: x509.Name | None, key: Any, ca: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, obj: Any) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


def test_hub_ingests_over_tls_with_credentials(hub_db_url: str, tmp_path: Path) -> None:
    from cloud_hub.db import open_db
    from cloud_hub.metrics import HubMetrics
    from cloud_hub.models import Device
    from cloud_hub.server import HubContext, start_ingest
    from edgeglm.mqtt import BrokerSettings
    from edgeglm.piece_store import PieceStore

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edgeglm test CA", ca_key, None, ca_key, True)
    srv = _cert("localhost", ca_key, ca.subject, srv_key, False)
    ca_file = _pem(tmp_path / "ca.pem", ca)
    creds_dir = tmp_path / "acl"
    write_acl(creds_dir, ["box-tls"], ["hub"])
    import json

    creds = json.loads((creds_dir / "credentials.json").read_text())
    port = free_port()
    listener = (
        f"listener {port} 127.0.0.1\ncafile {ca_file}\ncertfile {_pem(tmp_path / 'srv.pem', srv)}\n"
        f"keyfile {_pem(tmp_path / 'srv.key', srv_key)}\nallow_anonymous false\n"
    )
    settings = [f"password_file {creds_dir / 'passwd'}", f"acl_file {creds_dir / 'acl'}"]
    broker = ManagedBroker(tmp_path / "broker", port, listeners=listener, settings=settings).start()
    db = open_db(hub_db_url)
    link = ingest = None
    try:
        time.sleep(0.5)
        ctx = HubContext(db=db, store=PieceStore(tmp_path / "pieces"), trusted={}, metrics=HubMetrics())
        tls = BrokerSettings(port=port, username="hub", password=creds["hub"], ca_file=str(ca_file))
        with pytest.raises(UnavailableError):  # a wrong password is refused at CONNACK
            start_ingest(
                ctx,
                BrokerSettings(port=port, username="hub", password="wrong", ca_file=str(ca_file)),
                "hub-bad",
            )[0].close()
        link, ingest = start_ingest(ctx, tls, "hub-tls")
        ingest.flush_s = 0.1

        dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="box-tls", protocol=paho.MQTTv5)
        dev.username_pw_set("box-tls", creds["box-tls"])
        dev.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        dev.connect("127.0.0.1", port)
        dev.loop_start()
        health = Health(
            latency_p50_ms=1,
            latency_p95_ms=2,
            tokens_per_s=3,
            error_rate=0,
            queue_depth=0,
            rss_mb=100,
            requests=1,
            errors=0,
        )
        hb = Heartbeat(device_id="box-tls", ts=time.time(), health=health, seq=1)
        deadline = time.monotonic() + 20
        while True:
            dev.publish(heartbeat_topic("box-tls"), encode(hb), qos=1)
            with db.session() as s:
                row = s.get(Device, "box-tls")
            if row is not None:
                break
            assert time.monotonic() < deadline, "heartbeat over TLS never arrived"
            time.sleep(0.3)
        assert row.online and row.heartbeats >= 1
        dev.loop_stop()
    finally:
        if link is not None and ingest is not None:
            link.close()
            ingest.stop()
        db.dispose()
        broker.stop()
