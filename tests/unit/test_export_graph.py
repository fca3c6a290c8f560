"""The fused route's parts: MatMulNBits layout, safetensors reading, graph parity with transformers.

These use random weights on purpose: they test arithmetic identity (fp32 must match to ~1e-6), not
model quality. Quality-gate behaviour is tested on trained checkpoints in test_export_pipeline.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

from edgeglm.errors import ExportError, UnsupportedModel
from export.architectures import architecture_for
from export.checkpoint import Checkpoint
from export.fused import FusedOptions, build_fused
from export.onnx_writer import GraphWriter
from export.ort_runner import OrtDecoder
from export.quant import dequantize, quantize_blockwise


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize(
    ("bits", "block", "k"), [(4, 16, 64), (4, 32, 80), (4, 128, 256), (8, 32, 96), (8, 64, 64)]
)
def test_matmulnbits_matches_our_dequantization(tmp_path, bits, block, k, symmetric):
    """Asymmetric weights carry zero points; symmetric ones rely on the kernel's implicit 2^(bits-1)."""
    rng = np.random.default_rng(bits * block + k)
    w = rng.normal(0, 0.05, (48, k)).astype(np.float32)
    w[0, :block] += 0.2  # a skewed block: the symmetric grid still has to hold it
    qw = quantize_blockwise(w, bits, block, symmetric=symmetric)
    assert (qw.zero_points is None) == symmetric
    deq = dequantize(qw)
    step = np.abs(qw.scales).reshape(48, -1).repeat(block, axis=1)[:, :k]
    # rounding error at most half a step; symmetric also clips the top level (+2^(bits-1)) by one step
    assert (np.abs(deq - w) <= step * (1.01 if symmetric else 0.51)).all()
    g = GraphWriter(tmp_path)
    g.input("x", TensorProto.FLOAT, [3, k])
    inputs = ["x", g.weight("b", qw.packed), g.weight("s", qw.scales)]
    if not symmetric:
        inputs.append(g.weight("z", qw.zero_points))
    g.node(
        "MatMulNBits",
        inputs,
        ["y"],
        "mm",
        "com.microsoft",
        K=k,
        N=48,
        bits=bits,
        block_size=block,
        accuracy_level=0,
    )
    g.output("y", TensorProto.FLOAT, [3, 48])
    sess = ort.InferenceSession(str(g.save("mm")), providers=["CPUExecutionProvider"])
    x = rng.normal(0, 1, (3, k)).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ deq.T, atol=1e-4)


def _save(tmp_path, kind="glm", dtype=torch.float32, shard=None, **over):
    torch.manual_seed(0)
    conf = (
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            partial_rotary_factor=0.5,
            attention_bias=True,
            tie_word_embeddings=False,
            max_position_embeddings=256,
            pad_token_id=0,
        )
        | over
    )
    cfg, cls = (GlmConfig(**conf), GlmForCausalLM) if kind == "glm" else (Glm4Config(**conf), Glm4ForCausalLM)
    model = cls(cfg).eval()
    model.to(dtype).save_pretrained(tmp_path / "ckpt", max_shard_size=shard or "10GB")
    return model.float(), tmp_path / "ckpt"


@pytest.mark.parametrize(
    ("dtype", "shard"), [(torch.bfloat16, None), (torch.float16, "100KB"), (torch.float32, "50KB")]
)
def test_checkpoint_reads_bf16_fp16_and_shards(tmp_path, dtype, shard):
    model, folder = _save(tmp_path, dtype=dtype, shard=shard)
    ckpt = Checkpoint(folder)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    state = {k: v.to(dtype).float().numpy() for k, v in model.state_dict().items()}
    assert set(ckpt.names()) == set(state)
    for name, ref in state.items():
        np.testing.assert_array_equal(ckpt.tensor(name), ref)
    assert ckpt.digest().startswith("blake3:")
    ckpt.close()


SHAPES = {
    "glm-edge": dict(partial_rotary_factor=1.0, attention_bias=False, tie_word_embeddings=True),
    "glm4-9b": dict(partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False),
    "glm-gqa": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, partial_rotary_factor=1.0),
}


@pytest.mark.parametrize("kind", ["glm", "glm4"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fused_fp32_matches_transformers_prefill_and_decode(tmp_path, kind, shape):
    model, folder = _save(tmp_path, kind=kind, **SHAPES[shape])
    ckpt = Checkpoint(folder)
    arch = architecture_for(ckpt.config)
    path = build_fused(ckpt, arch, arch.spec(ckpt.config), FusedOptions(max_context=64), tmp_path / "onnx")
    dec = OrtDecoder(path)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.numpy()
    logits, past = dec.step(ids[:, :7].numpy(), dec.empty_past(2), 7)
    got = [logits]
    for t in range(7, 12):
        logits, past = dec.step(ids[:, t : t + 1].numpy(), past, t + 1)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), ref, atol=1e-4)
    greedy = dec.greedy(ids[:1, :5].numpy(), 8)
    with torch.no_grad():
        hf = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 5:].numpy()
    np.testing.assert_array_equal(greedy, hf)


def test_unsupported_model_type_names_what_is_supported():
    with pytest.raises(UnsupportedModel, match=r"glm \(GlmForCausalLM\), glm4 \(Glm4ForCausalLM\)"):
        architecture_for({"model_type": "llama"})


def test_gqa_limits_are_said_up_front(tmp_path):
    _, folder = _save(tmp_path, head_dim=24, partial_rotary_factor=1.0)
    ckpt = Checkpoint(folder)
    arch = architecture_for(ckpt.config)
    with pytest.raises(ExportError, match="multiple of 16"):
        build_fused(ckpt, arch, arch.spec(ckpt.config), FusedOptions(), tmp_path / "onnx")


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize(("bits", "block", "k"), [(4, 32, 64), (4, 16, 80), (8, 32, 96)])
def test_gather_block_quantized_reads_the_matmulnbits_layout(tmp_path, bits, block, k, symmetric):
    """A tied embedding gathers from the lm_head's quantized weight: rows must equal our dequantization."""
    rng = np.random.default_rng(k)
    w = rng.normal(0, 0.05, (40, k)).astype(np.float32)
    qw = quantize_blockwise(w, bits, block, symmetric=symmetric)
    kb = qw.packed.shape[1]
    g = GraphWriter(tmp_path)
    g.input("ids", TensorProto.INT64, [2, 3])
    views = []
    parts = [("b", qw.packed, kb * block * bits // 8), ("s", qw.scales, kb)]
    if qw.zero_points is not None:
        parts.append(("z", qw.zero_points, qw.zero_points.size // 40))
    for name, arr, cols in parts:
        g.weight(name, arr)
        views.append(
            g.node(
                "Reshape",
                [name, g.const(f"{name}_shape", np.array([40, cols], np.int64))],
                [f"{name}2d"],
                f"{name}_reshape",
            )
        )
    g.node(
        "GatherBlockQuantized",
        [views[0], "ids", *views[1:]],
        ["y"],
        "gbq",
        "com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=block,
        bits=bits,
    )
    g.output("y", TensorProto.FLOAT, [2, 3, kb * block])
    sess = ort.InferenceSession(str(g.save("gbq")), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 39], [7, 7, 1]], np.int64)
    (y,) = sess.run(None, {"ids": ids})
    np.testing.assert_allclose(y[..., :k], dequantize(qw)[ids], atol=1e-6)
