"""The int4 quantizer: least-squares scale search against round-to-nearest, in MatMulNBits' layout.

Random and heavy-tailed weights on purpose: these test the arithmetic (never worse than RTN per
block, the packed layout ONNX Runtime reads); model quality is gated on trained checkpoints in
test_export_pipeline.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from transformers import GlmConfig, GlmForCausalLM

from export.architectures import architecture_for
from export.checkpoint import Checkpoint
from export.fused import FusedOptions, build_fused
from export.onnx_writer import GraphWriter
from export.quant import dequantize, quantize_blockwise, search_scales


def _weights(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0, 0.05, shape).astype(np.float32)
    w = (rng.standard_t(3, shape) * 0.02).astype(np.float32)  # heavy tails
    w[rng.random(shape) < 0.002] *= 20  # and a few outliers, as trained LLM weights have
    return w


def _block_errors(w: np.ndarray, qw) -> np.ndarray:
    """Squared error per block [N, k_blocks]."""
    err = (dequantize(qw) - w) ** 2
    k_blocks = qw.packed.shape[1]
    err = np.pad(err, ((0, 0), (0, k_blocks * qw.block_size - w.shape[1])))
    return err.reshape(w.shape[0], k_blocks, qw.block_size).sum(-1)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize(("block", "k"), [(32, 256), (64, 200), (128, 384)])
def test_scale_search_never_loses_to_round_to_nearest(kind, block, k):
    w = _weights(kind, (64, k), seed=block + k)
    rtn = quantize_blockwise(w, 4, block, symmetric=True)
    searched = quantize_blockwise(w, 4, block, symmetric=True, search=True)
    e_rtn, e_search = _block_errors(w, rtn), _block_errors(w, searched)
    assert (e_search <= e_rtn * (1 + 1e-5) + 1e-12).all()  # every block, not just on average
    assert e_search.sum() < 0.97 * e_rtn.sum()  # and it gains: >= 3% less squared error here


def test_scale_search_weights_by_importance():
    """Channels marked important are reproduced better than with the plain search."""
    w = _weights("heavy", (64, 128), seed=3).reshape(64, 1, 128)
    imp = np.ones(128, np.float32)
    imp[:8] = 100.0
    plain = search_scales(w, -8, 7)
    weighted = search_scales(w, -8, 7, importance=imp)

    def err(s):
        q = np.clip(np.rint(w / s[..., None]), -8, 7) * s[..., None]
        return (((q - w) ** 2) * imp).sum()

    assert err(weighted) < 0.9 * err(plain)  # measured 3.28 against 4.71: the weights are used


def test_dequantize_reads_back_the_searched_integers():
    """Packing round trip: dequantize == clip(rint(w / s)) * s with the scales the search chose."""
    w = _weights("heavy", (40, 96), seed=7)  # 96 = 3 blocks of 32
    qw = quantize_blockwise(w, 4, 32, symmetric=True, search=True)
    s = qw.scales.reshape(40, 3, 1)
    expect = (np.clip(np.rint(w.reshape(40, 3, 32) / s), -8, 7) * s).reshape(40, 96)
    np.testing.assert_array_equal(dequantize(qw), expect)
    assert qw.zero_points is None and qw.packed.shape == (40, 3, 16)


def test_scale_search_handles_zero_blocks_and_padding():
    w = np.zeros((4, 80), np.float32)  # 80 = 2.5 blocks of 32: K is padded
    w[1, 40] = 0.5
    qw = quantize_blockwise(w, 4, 32, symmetric=True, search=True)
    assert np.isfinite(qw.scales).all()
    np.testing.assert_allclose(dequantize(qw), w, atol=1e-7)


def test_scale_search_is_refused_where_it_is_not_implemented():
    with pytest.raises(ValueError, match="symmetric"):
        quantize_blockwise(np.ones((2, 32), np.float32), 4, 32, search=True)


@pytest.mark.parametrize(
    ("block", "k", "bits"),
    [(32, 256, 4), (64, 256, 4), (128, 256, 4), (256, 512, 4), (256, 200, 4), (256, 512, 8), (256, 200, 8)],
)
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_matmulnbits_runs_the_searched_layout(tmp_path, block, k, bits, accuracy_level):
    """ONNX Runtime's MatMulNBits equals x @ dequantize(W)^T: exactly on the fp32 path, and within
    the int8 rounding of x on the int8-compute path the profiles ship (accuracy_level 4), up to
    block 256 and with K shorter than one block, at 4 bits and at 8 (cpu-x86-int4 is block 256 with
    an 8-bit first layer and head)."""
    n = 48
    w = _weights("heavy", (n, k), seed=block)
    qw = quantize_blockwise(w, bits, block, symmetric=True, search=True)
    g = GraphWriter(tmp_path)
    g.input("x", TensorProto.FLOAT, [3, k])
    g.node(
        "MatMulNBits",
        ["x", g.weight("b", qw.packed), g.weight("s", qw.scales)],
        ["y"],
        "mm",
        "com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    g.output("y", TensorProto.FLOAT, [3, n])
    sess = ort.InferenceSession(str(g.save("mm")), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(0, 1, (3, k)).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    want = x @ dequantize(qw).T
    if accuracy_level == 0:
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    else:  # x rounded to int8 per block: about 1% of the output's scale
        assert np.abs(y - want).max() < 0.02 * np.abs(want).max()


def _tiny_glm(tmp_path, tied: bool):
    torch.manual_seed(0)
    cfg = GlmConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=1.0,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    GlmForCausalLM(cfg).eval().save_pretrained(tmp_path / "ckpt")
    ckpt = Checkpoint(tmp_path / "ckpt")
    arch = architecture_for(ckpt.config)
    return ckpt, arch, arch.spec(ckpt.config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("head_int8", [True, False], ids=["head8", "head4"])
def test_int4_graph_keeps_embedding_and_lm_head_at_8_bits(tmp_path, tied, head_int8):
    ckpt, arch, spec = _tiny_glm(tmp_path, tied)
    opts = FusedOptions(weights="int4", block_size=32, symmetric=True, head_int8=head_int8, max_context=64)
    model = onnx.load(build_fused(ckpt, arch, spec, opts, tmp_path / "onnx"), load_external_data=False)
    quantized = ("MatMulNBits", "GatherBlockQuantized")
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in model.graph.node
        if n.op_type in quantized
    }
    head = 8 if head_int8 else 4
    assert bits["lm_head"] == head and bits["embed/GatherBlockQuantized"] == head
    assert {b for name, b in bits.items() if name.startswith("layers.")} == {4}


def test_a_weight_with_nan_or_inf_is_refused():
    """Round-to-nearest would carry a NaN into the scales where a reader sees it; the search would
    hide it (every candidate scores NaN and the block falls back to scale 1): both refuse."""
    for bad in (np.nan, np.inf):
        w = _weights("normal", (4, 64), seed=1)
        w[2, 5] = bad
        for search in (False, True):
            with pytest.raises(ValueError, match="NaN or infinite"):
                quantize_blockwise(w, 4, 32, symmetric=True, search=search)
