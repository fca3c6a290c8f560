"""edgectl: exit codes and first error lines (PRODUCT.md section 9), keys, bundle diff/verify."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.synth_weights import Dims, base_model, make_pair, quantize_int8, write_model
from edgectl import root
from edgeglm.bundle_files import seal_folder
from edgeglm.keys import create_keypair, load_private_key


def run(*args: str):
    return CliRunner().invoke(root, list(args))


@pytest.fixture()
def bundles(tmp_path):
    priv, pub, _ = create_keypair(tmp_path / "keys", "rel")
    key = load_private_key(priv)
    base = quantize_int8(base_model(Dims.tiny()))
    new = quantize_int8(make_pair(base_model(Dims.tiny()), "A"))
    old_dir, new_dir = write_model(base, tmp_path / "v1"), write_model(new, tmp_path / "v2")
    seal_folder(old_dir, key, model="m", version="1.0.0", profile="cpu-x86-int8")
    seal_folder(new_dir, key, model="m", version="1.1.0", profile="cpu-x86-int8")
    return old_dir, new_dir, pub, tmp_path


def test_keys_create_and_show(tmp_path):
    res = run("keys", "create", "fleet", "--dir", str(tmp_path), "--output", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["key_id"]) == 16
    shown = json.loads(run("keys", "show", data["public_key"], "-o", "json").stdout)
    assert shown["key_id"] == data["key_id"]
    again = run("keys", "create", "fleet", "--dir", str(tmp_path))
    assert again.exit_code == 1
    assert again.stderr.splitlines()[0].startswith("Error: key fleet: ")
    assert run("keys", "create", "bad/name", "--dir", str(tmp_path)).exit_code == 2


def test_bundle_diff_folders_json(bundles):
    old_dir, new_dir, _, _ = bundles
    res = run("bundle", "diff", str(old_dir), str(new_dir), "--output", "json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["mode"] == "delta" and not data["estimated"]
    assert 0 < data["bytes_to_send"] < 0.5 * data["new_bytes"]
    by_path = {f["path"]: f for f in data["files"]}
    assert by_path["model.onnx"]["bytes_to_send"] == 0  # unchanged graph: all pieces held
    assert by_path["model.onnx.data"]["delta"] > 0


def test_bundle_diff_onnx_models_and_plain_files(bundles, tmp_path):
    old_dir, new_dir, _, _ = bundles
    res = run("bundle", "diff", str(old_dir / "model.onnx"), str(new_dir / "model.onnx"))
    assert res.exit_code == 0, res.stderr
    assert "model.onnx.data" in res.stdout and "mode delta" in res.stdout
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(bytes(range(256)) * 1000)
    b.write_bytes(bytes(range(256)) * 1000 + b"tail")
    res = run("bundle", "diff", str(a), str(b), "--profile", "cpu-x86-int4", "-o", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["files"][0]["have"] >= 1


def test_bundle_diff_usage_errors(bundles, tmp_path):
    old_dir, _, _, _ = bundles
    res = run("bundle", "diff", str(old_dir), str(old_dir / "model.onnx"))
    assert res.exit_code == 2
    assert run("bundle", "diff", str(tmp_path / "nope"), str(old_dir)).exit_code == 2
    assert run("bundle", "diff", str(old_dir), str(old_dir), "--profile", "no-such").exit_code == 2


def test_bundle_verify_ok_and_refusals(bundles):
    _, new_dir, pub, tmp_path = bundles
    res = run("bundle", "verify", str(new_dir), "--trust", str(pub), "-o", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["verified"] is True

    _, other_pub, _ = create_keypair(tmp_path / "keys", "other")
    res = run("bundle", "verify", str(new_dir), "--trust", str(other_pub))
    assert res.exit_code == 1
    first, hint = res.stderr.splitlines()[:2]
    assert first.startswith("Error: manifest m@1.1.0: signed by key") and "not trusted" in first
    assert hint.startswith("hint: ")

    data = new_dir / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    res = run("bundle", "verify", str(new_dir), "--trust", str(pub))
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: bundle file model.onnx.data: digest does not match")


def test_bad_key_file_is_a_config_error(bundles, tmp_path):
    _, new_dir, _, _ = bundles
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    res = run("bundle", "verify", str(new_dir), "--trust", str(bad))
    assert res.exit_code == 78
    assert res.stderr.startswith("Error: public key ")


def test_demo_without_mosquitto_exits_69_with_the_install_command_before_any_work(tmp_path, monkeypatch):
    import edgectl.demo.procs as procs

    monkeypatch.setattr(procs, "find_mosquitto", lambda: None)
    res = run("demo", "--workdir", str(tmp_path))
    assert res.exit_code == 69, res.output
    assert res.output.startswith("Error: mosquitto: is not installed")
    assert "apt-get install mosquitto" in res.output
    assert not (tmp_path / "checkpoints").exists()  # it stopped before training anything
