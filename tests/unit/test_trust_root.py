"""The fleet's root of trust (edgeglm.trust_root): signing, the chain walk, rotation and refusal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeglm.errors import IntegrityError, SignatureError
from edgeglm.keys import key_id
from edgeglm.trust_root import (
    MAX_ROOT_BYTES,
    KeyRing,
    advance,
    chain_payload,
    parse_chain,
    parse_root,
    public_b64,
    root_body,
    sign_root,
)


def _body(version: int, roots: list[Any], release: list[Any], fleet: list[Any], threshold: int = 1) -> dict:
    return root_body(
        version,
        root=[k.public_key() for k in roots],
        release=[k.public_key() for k in release],
        fleet=[k.public_key() for k in fleet],
        expires_at=time.time() + 3600,
        threshold=threshold,
    )


def _kid(k: Ed25519PrivateKey) -> str:
    return key_id(k.public_key())


R1, R2, ROGUE = (Ed25519PrivateKey.generate() for _ in range(3))
REL1, REL2, F1, F2 = (Ed25519PrivateKey.generate() for _ in range(4))


def test_a_root_names_the_valid_keys_by_role_and_a_chain_rotates_and_revokes_them() -> None:
    v1 = parse_root(sign_root(_body(1, [R1], [REL1], [F1]), [R1]))
    assert set(v1.role("release")) == {_kid(REL1)} and set(v1.role("fleet")) == {_kid(F1)}
    v2 = sign_root(_body(2, [R1], [REL1, REL2], [F1, F2]), [R1])  # both valid while rotating
    v3 = sign_root(_body(3, [R2], [REL2], [F2]), [R1, R2])  # old keys revoked, root key rotated
    v4 = sign_root(_body(4, [R2], [REL2], [F2]), [R2])  # signed by the new root key alone
    newest = advance(v1, parse_chain(chain_payload([v4, v2, v3])))  # any order, walked by version
    assert newest.version == 4
    assert set(newest.role("release")) == {_kid(REL2)} and set(newest.role("fleet")) == {_kid(F2)}
    assert advance(newest, [v2, v3]).version == 4  # older versions change nothing


def test_a_next_version_not_signed_by_the_previous_root_keys_is_refused() -> None:
    v1 = parse_root(sign_root(_body(1, [R1], [REL1], [F1]), [R1]))
    rogue = sign_root(_body(2, [ROGUE], [REL2], [F2]), [ROGUE])  # self-consistent, but not chained
    with pytest.raises(SignatureError, match="not signed by the root keys of version 1"):
        advance(v1, [rogue])
    only_old = sign_root(_body(2, [R2], [REL1], [F1]), [R1])  # lacks the new root key's own signature
    with pytest.raises(SignatureError, match="fewer than 1 valid signature"):
        advance(v1, [only_old])
    gap = sign_root(_body(3, [R1], [REL2], [F2]), [R1])  # version 2 missing: nothing to walk
    assert advance(v1, [gap]).version == 1


def test_a_threshold_needs_that_many_distinct_root_keys() -> None:
    body = _body(1, [R1, R2], [REL1], [F1], threshold=2)
    with pytest.raises(SignatureError, match="fewer than 2"):
        parse_root(sign_root(body, [R1, R1]))  # one key twice is one signature
    assert parse_root(sign_root(body, [R1, R2])).version == 1


def test_tampered_malformed_and_oversized_roots_are_refused() -> None:
    raw = sign_root(_body(1, [R1], [REL1], [F1]), [R1])
    doc = json.loads(raw)
    doc["release"] = [_kid(F1)]  # names a listed key, but the signature no longer covers it
    with pytest.raises(SignatureError):
        parse_root(json.dumps(doc).encode())
    doc = json.loads(raw)
    doc["keys"][_kid(REL1)] = public_b64(ROGUE.public_key())  # an id that does not match its key
    with pytest.raises(IntegrityError, match="does not match its id"):
        parse_root(json.dumps(doc).encode())
    for bad in (b"[]", b"{", b'{"type": "edgeglm-root"}', b" " * (MAX_ROOT_BYTES + 1)):
        with pytest.raises(IntegrityError):
            parse_root(bad)
    with pytest.raises(ValueError, match="not listed in keys"):
        sign_root({**_body(1, [R1], [REL1], [F1]), "fleet": ["0" * 16]}, [R1])
    with pytest.raises(IntegrityError, match="two different roots numbered 1"):
        advance(parse_root(raw), [raw, sign_root(_body(1, [R1], [REL2], [F1]), [R1])])
    with pytest.raises(IntegrityError):
        parse_chain(b'{"roots": 5}')


def test_a_key_ring_is_replaced_whole_and_read_only() -> None:
    ring = KeyRing({_kid(REL1): REL1.public_key()})
    held = ring  # what the update machine keeps
    ring.replace({_kid(REL2): REL2.public_key()})
    assert list(held) == [_kid(REL2)] and _kid(REL1) not in held and len(held) == 1
    assert not hasattr(ring, "__setitem__")


def test_edgectl_signs_shows_and_refuses_a_root(tmp_path: Path) -> None:
    from edgectl import root as main

    runner = CliRunner()
    for name in ("root-1", "release", "fleet"):
        assert runner.invoke(main, ["keys", "create", name, "--dir", str(tmp_path)]).exit_code == 0
    args = ["keys", "root", "sign", "--sign-with", str(tmp_path / "root-1.key"), "--version", "1"]
    args += ["--release", str(tmp_path / "release.pub"), "--fleet", str(tmp_path / "fleet.pub")]
    r = runner.invoke(main, [*args, "--out", str(tmp_path / "root.json"), "--output", "json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(
        runner.invoke(main, ["keys", "root", "show", str(tmp_path / "root.json"), "-o", "json"]).output
    )
    assert shown["version"] == 1 and len(shown["release"]) == 1 and len(shown["fleet"]) == 1
    r = runner.invoke(main, [*args, "--threshold", "2", "--out", str(tmp_path / "bad.json")])
    assert r.exit_code == 2 and "threshold" in r.output and not (tmp_path / "bad.json").exists()
