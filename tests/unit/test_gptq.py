"""GPTQ into MatMulNBits' layout, and the calibration that feeds it.

Synthetic weights and correlated inputs test the arithmetic (the output error it removes, the
layout ONNX Runtime reads); the quality it buys on trained checkpoints is gated in the export
tests (cpu-x86-int4 ships ``quantizer = "gptq"``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from transformers import GlmConfig, GlmForCausalLM

from edgeglm.errors import ConfigError, ExportError, UsageError
from edgeglm.keys import create_keypair
from edgeglm.profiles import EXPORT_ONLY, load_profile
from export.architectures import architecture_for
from export.calibration import calibrate, from_texts, self_generated
from export.checkpoint import Checkpoint
from export.fused import FusedOptions, build_fused, calibration_targets
from export.gptq import quantize_gptq
from export.quant import dequantize, quantize_blockwise
from tests.derived_profiles import derived_profile


def _layer(n: int, k: int, tokens: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight [n, k] and inputs [tokens, k] whose channels correlate, a few of them large."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    mix = rng.normal(0, 0.3, (k, k)) + np.eye(k)
    x = (rng.normal(size=(tokens, k)) @ mix).astype(np.float32)
    x[:, :4] *= 10  # outlier channels, as LLM activations have
    return w, x


def _out_error(x: np.ndarray, w: np.ndarray, qw) -> float:
    return float(np.linalg.norm(x @ (w - dequantize(qw)).T))


@pytest.mark.parametrize(("block", "k"), [(32, 128), (64, 200), (128, 256)])
def test_gptq_halves_the_output_error_of_the_scale_search(block, k):
    w, x = _layer(48, k, seed=block)
    hessian = x.T @ x / len(x)
    searched = quantize_blockwise(w, 4, block, symmetric=True, search=True)
    gptq = quantize_gptq(w, hessian, 4, block)
    assert _out_error(x, w, gptq) < 0.7 * _out_error(x, w, searched)
    # 8 bits too (cpu-x86-int8 could ask for it): far smaller error, still less than round-to-nearest
    assert _out_error(x, w, quantize_gptq(w, hessian, 8, block)) < _out_error(
        x, w, quantize_blockwise(w, 8, block, symmetric=True)
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 80])  # 80: padded to three blocks of 32
def test_with_uncorrelated_inputs_gptq_is_the_scale_search(bits, k):
    """A diagonal Hessian spreads no error: every column rounds alone, so the codes and scales are
    exactly the search's (the layout is shared, byte for byte, padding included)."""
    w, _ = _layer(16, k)
    diagonal = np.diag(np.linspace(0.5, 2.0, k)).astype(np.float32)
    gptq = quantize_gptq(w, diagonal, bits, 32)
    searched = quantize_blockwise(w, bits, 32, symmetric=True, search=True)
    assert gptq.zero_points is None and gptq.packed.shape == searched.packed.shape
    np.testing.assert_array_equal(gptq.packed, searched.packed)
    np.testing.assert_allclose(gptq.scales, searched.scales, rtol=1e-6)


def test_gptq_handles_padding_dead_inputs_and_refuses_bad_input():
    w, x = _layer(8, 80)  # 80 is not a whole number of 32-blocks: padded like quantize_blockwise
    x[:, 10:14] = 0  # inputs the calibration never activated
    qw = quantize_gptq(w, x.T @ x / len(x), 4, 32)
    assert qw.packed.shape == (8, 3, 16) and np.isfinite(dequantize(qw)).all()
    assert np.abs(dequantize(qw)[:, 10:14] - w[:, 10:14]).max() < 0.05  # rounded, not left to drift
    with pytest.raises(ValueError, match="hessian is"):
        quantize_gptq(w, np.eye(64, dtype=np.float32), 4, 32)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_gptq(bad, np.eye(80, dtype=np.float32), 4, 32)
    with pytest.raises(ValueError, match="Hessian has NaN"):
        quantize_gptq(w, np.full((80, 80), np.inf, np.float32), 4, 32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained two-layer GLM with a byte-level tokenizer: shapes and plumbing, not quality."""
    from export.tiny_glm import train_tokenizer

    root = tmp_path_factory.mktemp("gptq")
    tok = train_tokenizer("Sensor 4 on the press reads 71 bar. The limit is 80 bar.\n" * 40, 300)
    cfg = GlmConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=1.0,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    GlmForCausalLM(cfg).eval().save_pretrained(root / "ckpt")
    tok.save(str(root / "ckpt" / "tokenizer.json"))
    return root / "ckpt"


def test_calibration_keeps_each_layers_inputs_from_self_generated_text(tiny):
    from tokenizers import Tokenizer

    ckpt = Checkpoint(tiny)
    arch = architecture_for(ckpt.config)
    spec = arch.spec(ckpt.config)
    targets = calibration_targets(arch, spec)
    calib = calibrate(tiny, targets, samples=4, length=200)  # cut at max_position_embeddings
    assert calib.tokens == 4 * 64 and calib.source == "self-generated"
    widths = {"q_proj": 64, "o_proj": spec.heads * spec.head_dim, "gate_up_proj": 64, "down_proj": 128}
    for name in targets:
        h = calib.hessian(name)
        want = next(v for k, v in widths.items() if k in name)
        assert h.shape == (want, want) and np.allclose(h, h.T, atol=1e-4) and (np.diag(h) >= 0).all()
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    model = GlmForCausalLM.from_pretrained(tiny).eval()
    prefix = tokenizer.encode("").ids
    samples = self_generated(model, tokenizer, 3, 12, seed=1)
    assert len(samples) == 3 and all(s[: len(prefix)] == prefix and len(s) == 12 for s in samples)
    assert samples == self_generated(model, tokenizer, 3, 12, seed=1)  # seeded: exports repeat
    assert from_texts(tokenizer, ["Sensor 4 reads 71 bar.", ""], 5)[0][: len(prefix)] == prefix
    operator = calibrate(tiny, targets[:1], texts=["Sensor 4 on the press reads 71 bar."] * 3)
    assert operator.source == "operator text" and operator.hessian(targets[0]).shape == (64, 64)
    with pytest.raises(ExportError, match="no linear"):
        calibrate(tiny, ["model.layers.0.self_attn.nope.weight"], samples=1, length=4)


def test_gptq_graph_runs_and_needs_its_calibration(tiny, tmp_path):
    import onnxruntime as ort

    ckpt = Checkpoint(tiny)
    arch = architecture_for(ckpt.config)
    spec = arch.spec(ckpt.config)
    opts = FusedOptions(
        weights="int4", block_size=32, symmetric=True, gptq=True, int8_layers=1, max_context=64
    )
    with pytest.raises(ExportError, match="needs calibration"):
        build_fused(ckpt, arch, spec, opts, tmp_path / "none")
    calib = calibrate(tiny, calibration_targets(arch, spec), samples=2, length=32)
    targets = calibration_targets(arch, spec)
    path = build_fused(ckpt, arch, spec, opts, tmp_path / "onnx", calibration=calib)
    assert not any(t in calib for t in targets)  # every layer went through GPTQ and let go of its inputs
    model = onnx.load(path, load_external_data=False)
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }
    layer0 = {b for name, b in bits.items() if name.startswith("layers.0.")}
    layer1 = {b for name, b in bits.items() if name.startswith("layers.1.")}
    assert len([n for n in bits if n.startswith("layers.0.")]) == 4  # qkv, o, gate_up, down
    assert layer0 == {8} and layer1 == {4}  # int8_layers = 1: the first layer only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[1, 2, 3]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
    logits = session.run(["logits"], feeds)[0]
    assert logits.shape == (1, 3, spec.vocab) and np.isfinite(logits).all()
    with pytest.raises(ExportError, match="symmetric int4/int8"):
        build_fused(
            ckpt, arch, spec, FusedOptions(weights="int4", gptq=True), tmp_path / "asym", calibration=calib
        )


def test_the_memory_estimate_counts_the_8_bit_first_layers(tiny):
    from export.pipeline import estimate_memory_mb

    config = Checkpoint(tiny).config
    spec = architecture_for(config).spec(config)
    four = derived_profile("cpu-x86-int4", "t-l0", int8_layers=0)
    one = derived_profile("cpu-x86-int4", "t-l1", int8_layers=1)
    attention = spec.hidden * (spec.q_dim + 2 * spec.kv_dim) + spec.q_dim * spec.hidden
    layer = attention + 3 * spec.hidden * spec.intermediate
    # one layer moves from 4 to 8 bits a weight, the same fp32 scale per block: half a byte more
    grown = (estimate_memory_mb(spec, one)[0] - estimate_memory_mb(spec, four)[0]) * (1 << 20)
    assert grown == pytest.approx(layer * 0.5, rel=1e-6)


def test_profile_and_export_refuse_a_quantizer_or_calibration_they_cannot_use(tmp_path):
    from export.pipeline import run_export
    from export.spec import ExportSpec

    with pytest.raises(ConfigError, match="quantizer"):
        derived_profile("cpu-arm-int4", "t-arm-gptq", quantizer="gptq")  # asymmetric
    with pytest.raises(ConfigError, match="quantizer"):
        derived_profile("cpu-x86-int4", "t-bad-q", quantizer="hqq")
    with pytest.raises(ConfigError, match="int8_layers"):
        derived_profile("cpu-x86-int8", "t-int8-layers", int8_layers=1)  # int8 weights already
    with pytest.raises(ConfigError, match="int8_layers"):
        derived_profile("cpu-arm-int4", "t-arm-layers", int8_layers=1)  # asymmetric
    with pytest.raises(ConfigError, match="scale search is for int4"):
        derived_profile("cpu-x86-int8", "t-int8-search", quantizer="search")
    shipped = load_profile("cpu-x86-int4")
    assert shipped.quantizer == "gptq" and shipped.int8_layers == 1
    served = shipped.serving()  # what a manifest records: no export-only key given
    assert served.quantizer is None and served.int8_layers == 0
    assert not EXPORT_ONLY & served.model_fields_set
    assert served.block_size == shipped.block_size and served.quality == shipped.quality
    texts = tmp_path / "calib.json"
    texts.write_text(json.dumps(["some text"]))
    private, _, _ = create_keypair(tmp_path / "keys", "k")
    spec = ExportSpec(
        checkpoint=tmp_path,  # never read: the flag is refused first
        profile=load_profile("cpu-x86-int8"),
        version="1.0.0",
        model_name="m",
        out_dir=tmp_path / "out",
        key_path=private,
        calibration=texts,
    )
    with pytest.raises(UsageError, match=r"--calibration.*does not calibrate"):
        run_export(spec)


def test_a_manifest_records_the_serving_profile_and_round_trips(tmp_path):
    """An agent older than the export-only keys refuses unknown keys, so a manifest leaves them out;
    and a manifest read back dumps to the same document (its digest is how the agent knows it)."""
    from edgeglm.bundle import Manifest, load_manifest
    from edgeglm.bundle_files import seal_folder
    from edgeglm.keys import load_private_key, load_public_keys

    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    private, public, _ = create_keypair(tmp_path / "keys", "k")
    shipped = load_profile("cpu-x86-int4")
    seal_folder(
        folder,
        load_private_key(private),
        model="m",
        version="1.0.0",
        profile=shipped.name,
        device_profile=shipped.serving(),
        quality={"quantizer": "gptq", "int8_layers": 1, "calibration": {"tokens": 2048}},
    )
    manifest, doc = load_manifest(folder, trusted=load_public_keys([public]))
    assert not EXPORT_ONLY & doc["device_profile"].keys()
    assert manifest.quality.quantizer == "gptq" and manifest.quality.int8_layers == 1
    assert manifest.to_json_dict() == {k: v for k, v in doc.items()}
    # a manifest that spelled the keys out (or calibration as a word) keeps them, byte for byte
    spelled = {**doc, "device_profile": {**doc["device_profile"], "quantizer": None, "int8_layers": 0}}
    spelled["quality"] = {**doc["quality"], "calibration": "self-generated"}
    assert Manifest.model_validate(spelled).to_json_dict() == spelled
