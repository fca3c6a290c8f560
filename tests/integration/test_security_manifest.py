"""Finding 3 of issue 22: a manifest costs no more to refuse than its own length.

Validation used to expand a tensor file's piece layout (one segment per ``piece_bytes`` of its
declared size) before the signature was checked: a 360-byte manifest cost 15.9 s and 1.15 GB of
the hub's memory, never released. Against a real ``edgectl hub serve`` process: small manifests
declaring millions of pieces, unsigned, signed by a stranger, and signed by the trusted release
key itself, are refused 4xx while the hub's peak memory (``VmHWM``) stays where it was; a signed
manifest with a key twice in one object (the last wins in ``json.loads``, the first in other
parsers, and the signature covered only one reading) is refused too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.hub_process import start_hub

pytestmark = [pytest.mark.integration, pytest.mark.security]


def _peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _bomb(pieces: int) -> dict[str, Any]:
    """~360 bytes declaring a tensor file of ``pieces`` one-byte pieces, listed as one piece."""
    entry = {
        "path": "model.onnx.data", "size": pieces, "digest": "blake3:" + "0" * 64,
        "layout": "tensors", "piece_bytes": 1, "pieces": [["1" * 64, pieces]],
    }  # fmt: skip
    return {"model": "glm-tiny", "version": "6.6.6", "profile": "cpu-x86-int4", "files": [entry]}


def test_manifests_that_declare_huge_layouts_cost_the_hub_nothing(tmp_path, publisher):
    from cloud_hub.auth import Role, create_token
    from cloud_hub.db import migrate, open_db
    from edgeglm.bundle import sign_manifest
    from edgeglm.keys import create_keypair, load_private_key

    db = f"sqlite:///{tmp_path / 'hub.db'}"
    migrate(db)
    database = open_db(db)
    with database.session() as s:
        _, token = create_token(s, "op", Role.operator, "test")
    database.dispose()
    stranger = load_private_key(create_keypair(tmp_path / "keys", "stranger")[0])
    proc, url = start_hub("--db", db, "--data", str(tmp_path / "data"), "--trust", str(publisher.public_path))
    try:
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        before = _peak_kib(proc.pid)
        bomb = _bomb(8_000_000)
        assert len(json.dumps(bomb)) < 400
        signed_by_stranger = dict(bomb, signature=sign_manifest(_bomb(1), stranger)["signature"])
        for doc, why in ((bomb, "not signed"), (signed_by_stranger, "not trusted")):
            r = client.post("/api/v1/uploads", content=json.dumps(doc))
            assert r.status_code == 422 and why in r.json()["error"]["why"], r.text
        # Signed by the release key itself (a mistaken or malicious export): refused by the caps,
        # before any expansion.
        r = client.post("/api/v1/uploads", content=json.dumps(_signed_anyway(bomb, publisher.key)))
        assert r.status_code == 422 and "piece_bytes" in r.json()["error"]["why"], r.text
        grown_mib = (_peak_kib(proc.pid) - before) / 1024
        assert grown_mib < 64, f"the hub's peak memory grew by {grown_mib:.0f} MiB"

        # A key twice in one object: refused, even though the signature covers one reading of it.
        folder = publisher.bundle("1.0.0")
        doc = json.loads((folder / "manifest.json").read_text())
        text = json.dumps(doc)
        twice = text.replace('"version": "1.0.0"', '"version": "9.9.9", "version": "1.0.0"', 1)
        assert twice != text and json.loads(twice) == doc  # the standard library sees the signed doc
        r = client.post("/api/v1/uploads", content=twice)
        assert r.status_code == 422 and "twice" in r.json()["error"]["why"], r.text
        r = client.post("/api/v1/uploads", content=text)  # the same manifest, once: accepted
        assert r.status_code == 201, r.text
    finally:
        proc.terminate()
        proc.wait(20)


def _signed_anyway(doc: dict[str, Any], key: Any) -> dict[str, Any]:
    """``doc`` with a valid signature by ``key``, without the validation ``sign_manifest`` does."""
    import base64

    from edgeglm.bundle import canonical_bytes
    from edgeglm.keys import key_id

    sig = key.sign(canonical_bytes(doc))
    value = base64.b64encode(sig).decode()
    return {**doc, "signature": {"alg": "ed25519", "key_id": key_id(key.public_key()), "value": value}}
