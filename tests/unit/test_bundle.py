"""Bundle manifests: signing, verification, and every way a manifest can try to escape."""

from __future__ import annotations

import json
import os

import pytest

from bench.synth_weights import Dims, base_model, write_model
from edgeglm.bundle import (
    MANIFEST_NAME,
    canonical_bytes,
    load_manifest,
    manifest_digest,
    parse_manifest,
    sign_manifest,
    verify_files,
)
from edgeglm.bundle_files import FolderSource, describe_folder, seal_folder
from edgeglm.errors import IntegrityError, SignatureError
from edgeglm.keys import create_keypair, key_id, load_private_key, load_public_keys


@pytest.fixture()
def keys(tmp_path):
    priv, pub, _ = create_keypair(tmp_path / "keys", "release")
    other_priv, _other_pub, _ = create_keypair(tmp_path / "keys", "intruder")
    return load_private_key(priv), load_public_keys([pub]), load_private_key(other_priv)


@pytest.fixture()
def sealed(tmp_path, keys):
    folder = write_model(base_model(Dims.tiny()), tmp_path / "bundle")
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": list(range(3000))}))
    manifest, doc = seal_folder(
        folder, keys[0], model="glm-edge-test", version="1.0.0", profile="cpu-x86-int8"
    )
    return folder, manifest, doc


def test_seal_and_verify(sealed, keys):
    folder, manifest, _ = sealed
    loaded, _ = load_manifest(folder, keys[1])
    assert loaded == manifest
    verify_files(loaded, folder)
    layouts = {f.path: f.layout for f in loaded.files}
    assert layouts == {"model.onnx": "cdc", "model.onnx.data": "tensors", "tokenizer.json": "cdc"}
    data = next(f for f in loaded.files if f.path == "model.onnx.data")
    assert len(data.tensors) == 3 * 9 + 2
    # every piece is served back from the folder, verified
    source = FolderSource.of(folder, loaded)
    for f in loaded.files:
        for pid, size in f.pieces:
            assert len(source.read(pid)) == size


def test_private_key_file_is_private(tmp_path):
    priv, _pub, kid = create_keypair(tmp_path, "k")
    assert oct(os.stat(priv).st_mode & 0o777) == "0o600"
    assert key_id(load_private_key(priv).public_key()) == kid


def test_wrong_key_is_refused(sealed, keys):
    _folder, manifest, _doc = sealed
    forged = sign_manifest(manifest, keys[2])
    with pytest.raises(SignatureError, match="not trusted"):
        parse_manifest(json.dumps(forged), keys[1])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.__setitem__("version", "1.0.1"),
        lambda d: d["files"][0].__setitem__("digest", "blake3:" + "0" * 64),
        lambda d: d.__setitem__("quality", {"passed": True}),
        lambda d: d["signature"].__setitem__("value", d["signature"]["value"][::-1]),
        lambda d: d["signature"].__setitem__("value", "!!not base64!!"),
    ],
)
def test_modified_manifest_is_refused(sealed, keys, mutate):
    _, _, doc = sealed
    doc = json.loads(json.dumps(doc))
    mutate(doc)
    with pytest.raises(SignatureError):
        parse_manifest(json.dumps(doc), keys[1])


def test_unsigned_manifest_is_refused(sealed, keys):
    _, _, doc = sealed
    doc = {k: v for k, v in doc.items() if k != "signature"}
    with pytest.raises(SignatureError, match="not signed"):
        parse_manifest(json.dumps(doc), keys[1])


def test_canonical_form_ignores_key_order_and_whitespace(sealed, keys):
    _, _, doc = sealed
    shuffled = json.loads(json.dumps(doc), object_pairs_hook=lambda kv: dict(reversed(kv)))
    assert canonical_bytes(shuffled) == canonical_bytes(doc)
    parse_manifest(json.dumps(shuffled, indent=4), keys[1])
    assert manifest_digest(shuffled) == manifest_digest(doc)


def test_file_digest_mismatch_is_refused(sealed, keys):
    folder, manifest, _ = sealed
    path = folder / "model.onnx.data"
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="digest"):
        verify_files(manifest, folder)


def test_missing_and_resized_files_are_refused(sealed):
    folder, manifest, _ = sealed
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(IntegrityError, match="bytes, manifest says"):
        verify_files(manifest, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_files(manifest, folder)


def test_symlinked_file_is_refused(sealed, tmp_path):
    folder, manifest, _ = sealed
    target = tmp_path / "elsewhere.json"
    target.write_bytes((folder / "tokenizer.json").read_bytes())
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(target)
    with pytest.raises(IntegrityError, match="symlink"):
        verify_files(manifest, folder)
    with pytest.raises(IntegrityError, match="symlink"):
        describe_folder(folder)


BAD_PATHS = [
    "/etc/passwd",
    "../escape",
    "a/../../b",
    "./x",
    "a//b",
    "a\\b",
    "C:x",
    "",
    "x\x00y",
    MANIFEST_NAME,
    "a/",
]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_unsafe_paths_are_refused_even_when_signed(sealed, keys, bad):
    _, manifest, _ = sealed
    doc = manifest.to_json_dict()
    doc["files"][0]["path"] = bad
    with pytest.raises(IntegrityError, match=r"files\.0\.path"):
        sign_manifest(doc, keys[0])
    doc["signature"] = sealed[2]["signature"]
    with pytest.raises(IntegrityError):
        parse_manifest(json.dumps(doc), keys[1])


@pytest.mark.parametrize("dup", ["model.onnx", "MODEL.onnx", "model.onnx/inner"])
def test_duplicate_or_colliding_names_are_refused(sealed, dup):
    _, manifest, _ = sealed
    doc = manifest.to_json_dict()
    extra = dict(doc["files"][-1], path=dup)
    doc["files"].append(extra)
    with pytest.raises(IntegrityError, match=r"listed twice|used as a directory"):
        parse_manifest(json.dumps(doc), None)


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b"{", b'{"model": 1}', b"\xff\xfe", json.dumps({"format_version": 2}).encode(), b"1e999999"],
)
def test_garbage_manifests_raise_integrity_error(raw):
    with pytest.raises(IntegrityError):
        parse_manifest(raw, None)


def test_piece_table_must_match_tensor_table(sealed):
    _, manifest, _ = sealed
    doc = manifest.to_json_dict()
    data = next(f for f in doc["files"] if f["layout"] == "tensors")
    data["pieces"][0], data["pieces"][1] = data["pieces"][1], data["pieces"][0]
    if data["pieces"][0][1] == data["pieces"][1][1]:
        data["tensors"][0]["offset"] += 64
    with pytest.raises(IntegrityError, match="pieces do not match"):
        parse_manifest(json.dumps(doc), None)


def test_the_signature_is_checked_before_the_layout_is_expanded(sealed, keys):
    """A manifest declaring 10**12 one-byte pieces costs nothing: unsigned it is refused as
    unsigned, and even without a signature check the piece table's own caps refuse it."""
    import tracemalloc

    _, manifest, _ = sealed
    doc = manifest.to_json_dict()
    data = next(f for f in doc["files"] if f["layout"] == "tensors")
    data.update(size=10**12, piece_bytes=1, pieces=[["1" * 64, 10**12]])
    del doc["signature"]
    tracemalloc.start()
    try:
        with pytest.raises(SignatureError, match="not signed"):
            parse_manifest(json.dumps(doc), keys[1])
        with pytest.raises(IntegrityError, match="larger than piece_bytes"):
            parse_manifest(json.dumps(doc), None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    data.update(size=(1 << 18) + 1, pieces=[["1" * 64, 1]] * ((1 << 18) + 1))
    with pytest.raises(IntegrityError, match="pieces"):
        parse_manifest(json.dumps(doc), None)


@pytest.mark.parametrize("key", ["version", "digest", "alg"])
def test_a_key_twice_in_one_object_is_refused(sealed, keys, key):
    _, _, doc = sealed
    text = json.dumps(doc)
    at = text.index(f'"{key}": ')
    twice = text[:at] + f'"{key}": "x", ' + text[at:]
    assert json.loads(twice) == doc  # what the standard library (and the signature) would see
    with pytest.raises(IntegrityError, match="twice"):
        parse_manifest(twice, keys[1])
    with pytest.raises(IntegrityError, match="twice"):
        parse_manifest(twice, None)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_a_manifest_is_utf8_only(sealed, keys, encoding):
    """``json.loads(bytes)`` would guess these; a signed manifest is read one way only."""
    _, _, doc = sealed
    parse_manifest(json.dumps(doc).encode(), keys[1])
    with pytest.raises(IntegrityError, match="not valid JSON"):
        parse_manifest(json.dumps(doc).encode(encoding), keys[1])
