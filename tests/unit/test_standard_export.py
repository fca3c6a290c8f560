"""The standard route: optimum-onnx export, the single external-data file, fp16 and QDQ weights.

Random (seeded) weights on purpose: these test arithmetic identity with transformers and the
graph's contract (optimum's names, past length 0), not model quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM, Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

from edgeglm.errors import ExportError, UnsupportedModel
from export.quantize_qdq import quantize_standard
from export.standard import DATA_NAME, INLINE_BELOW, export_standard

MODEL_TYPES = ("glm", "glm4")
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 256
_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "intermediate_size": 128,
    "vocab_size": VOCAB,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "max_position_embeddings": 128,
    "initializer_range": 0.1,  # peaked enough that greedy decoding is not a coin toss
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
_BUILDERS = {"glm": (GlmConfig, GlmForCausalLM), "glm4": (Glm4Config, Glm4ForCausalLM)}


def _past_names() -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]


def _tiny_checkpoint(model_type: str, folder: Path) -> Path:
    config_cls, model_cls = _BUILDERS[model_type]
    torch.manual_seed(0)
    model = model_cls(config_cls(**_SHAPE))
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: a bug there would hide
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {t: _tiny_checkpoint(t, root / t) for t in MODEL_TYPES}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standard")
    return {t: export_standard(checkpoints[t], root / t, model_type=t) for t in MODEL_TYPES}


class _Decoder:
    """Prefill then single-token steps, feeding ``present.*`` back as ``past_key_values.*``."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        kinds = {i.name: i.type for i in self.session.get_inputs()}
        dtype = np.float16 if "float16" in kinds["past_key_values.0.key"] else np.float32
        self.past = {n: np.zeros((1, KV_HEADS, 0, HEAD_DIM), dtype) for n in _past_names()}
        self.length = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, self.length + n), np.int64),
            "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None],
            **self.past,
        }
        out = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        self.past = {n: out[n.replace("past_key_values", "present")] for n in _past_names()}
        self.length += n
        return out["logits"]


def _prompt(length: int = 12) -> np.ndarray:
    return np.random.default_rng(7).integers(3, VOCAB, (1, length), dtype=np.int64)


def _onnx_logits(path: Path, ids: np.ndarray, prefill: int = 8) -> np.ndarray:
    decoder = _Decoder(path)
    steps = [decoder(ids[:, :prefill])] + [decoder(ids[:, t : t + 1]) for t in range(prefill, ids.shape[1])]
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_graph_has_optimums_names_and_one_data_file(exported, model_type):
    path = exported[model_type]
    model = onnx.load(path, load_external_data=False)
    assert [i.name for i in model.graph.input] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        *_past_names(),
    ]
    presents = [n.replace("past_key_values", "present") for n in _past_names()]
    assert [o.name for o in model.graph.output] == ["logits", *presents]
    assert {p.name for p in path.parent.iterdir()} == {
        "model.onnx",
        DATA_NAME,
        "config.json",
        "generation_config.json",
    }
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {DATA_NAME}
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert "model.embed_tokens.weight" in external and len(external) > 6 * LAYERS
    inline = [t for t in model.graph.initializer if t.name not in external]
    assert all(len(t.raw_data) < INLINE_BELOW for t in inline)  # axes and shapes, never weights


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prefill_and_decode_match_transformers(checkpoints, exported, model_type):
    ids = _prompt()
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[model_type], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    got = _onnx_logits(exported[model_type], ids)  # prefill 8 tokens, then 4 single-token steps
    assert got.shape == expected.shape == (1, 12, VOCAB)
    assert np.abs(got - expected).max() < 1e-4


def test_ort_model_for_causal_lm_generates_like_transformers(checkpoints, exported):
    from optimum.onnxruntime import ORTModelForCausalLM

    ids = torch.from_numpy(_prompt(6))
    greedy = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False}
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["glm"], dtype=torch.float32).eval()
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
    onnx_model = ORTModelForCausalLM.from_pretrained(exported["glm"].parent, provider="CPUExecutionProvider")
    got = onnx_model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
    assert got.shape == (1, 22)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("weights", ["fp16", "int8", "int4"])
def test_quantized_graphs_run_on_cpu(exported, tmp_path, model_type, weights):
    path = quantize_standard(exported[model_type], tmp_path, weights=weights, block_size=32)
    assert {p.name for p in tmp_path.iterdir()} == {"model.onnx", DATA_NAME}
    ids = _prompt()
    logits = _onnx_logits(path, ids)
    assert logits.shape == (1, 12, VOCAB)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    fp32 = _onnx_logits(exported[model_type], ids)
    cosine = (logits * fp32).sum(-1) / np.linalg.norm(logits, axis=-1) / np.linalg.norm(fp32, axis=-1)
    assert cosine.min() > 0.9  # coarse: catches a miswired graph, not quantization noise


def test_int4_is_blockwise_dequantize_linear(exported, tmp_path):
    path = quantize_standard(exported["glm"], tmp_path, weights="int4", block_size=32)
    model = onnx.load(path, load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 6 * LAYERS + 1  # q, k, v, o, gate_up, down per layer + lm_head
    producer = {o: n for n in model.graph.node for o in n.output}
    head = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == "logits"}
    body = [n for n in dq if n.output[0] not in head]
    assert len(body) == 6 * LAYERS and all(
        {a.name: a.i for a in n.attribute}.get("block_size") == 32 for n in body
    )
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert {types[n.input[0]] for n in body} == {onnx.TensorProto.INT4}
    # the lm_head (the MatMul that makes logits) stays int8 per output channel
    (head_dq,) = (producer[name] for name in head)
    assert types[head_dq.input[0]] == onnx.TensorProto.INT8
    assert {a.name: a.i for a in head_dq.attribute} == {"axis": 1}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21


def test_int8_is_per_channel_dequantize_linear(exported, tmp_path):
    path = quantize_standard(exported["glm"], tmp_path, weights="int8", block_size=128)
    model = onnx.load(path, load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert dq and {types[n.input[0]] for n in dq} == {onnx.TensorProto.INT8}
    assert all({a.name: a.i for a in n.attribute} == {"axis": 1} for n in dq)


def test_fp16_keeps_logits_fp32_and_caches_fp16(exported, tmp_path):
    path = quantize_standard(exported["glm"], tmp_path, weights="fp16", block_size=0)
    model = onnx.load(path, load_external_data=False)
    elem = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert elem["logits"] == onnx.TensorProto.FLOAT
    assert elem["input_ids"] == onnx.TensorProto.INT64
    assert elem["past_key_values.0.key"] == elem["present.1.value"] == onnx.TensorProto.FLOAT16


def test_unsupported_model_type_names_the_supported_ones(checkpoints, tmp_path):
    with pytest.raises(UnsupportedModel, match="glm, glm4"):
        export_standard(checkpoints["glm"], tmp_path, model_type="llama")


def test_model_type_must_match_the_checkpoint(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="model_type 'glm4'"):
        export_standard(checkpoints["glm4"], tmp_path, model_type="glm")


def test_unknown_weights_are_an_export_error(exported, tmp_path):
    with pytest.raises(ExportError, match="fp32, fp16, int8, int4"):
        quantize_standard(exported["glm"], tmp_path, weights="int3", block_size=32)
