"""The export's memory estimate (checked against the profile's budget before any weight is read)
counts what the fused graph stores: rows padded to whole blocks, a block cut to a short row, the
8-bit head and first layers, one quantized table for a tied lm_head and two for an untied one."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
from transformers import GlmConfig, GlmForCausalLM

from edgeglm.profiles import load_profile
from export.architectures import architecture_for
from export.checkpoint import Checkpoint
from export.fused import FusedOptions, build_fused
from export.pipeline import estimate_memory_mb
from tests.derived_profiles import derived_profile

QUANTIZED = (".qweight", ".scales", ".qzeros")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    """Untrained, with an MLP width (400) that is no whole number of blocks: the down projection's
    rows are padded at every block size the profiles use (GLM-4-9B's is 13696)."""
    cfg = GlmConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=400,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        partial_rotary_factor=0.5,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=request.param,
    )
    folder = tmp_path_factory.mktemp("estimate") / "ckpt"
    GlmForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def _stored_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the quantized initializers (packed weights, scales, zero points) in the data file."""
    total = 0
    for init in model.graph.initializer:
        if init.name.endswith(QUANTIZED):
            total += int({e.key: e.value for e in init.external_data}["length"])
    return total


@pytest.mark.parametrize(
    "profile",
    [
        load_profile("cpu-x86-int4"),  # block 256: cut to 128 on the 128-wide rows, 400 padded to 512
        load_profile("cpu-x86-int8"),  # block 256, 8 bits: 400 padded to 512
        load_profile("cpu-arm-int4"),  # asymmetric: zero points, a 4-bit head
        derived_profile("cpu-x86-int4", "t-b64", block_size=64, int8_layers=0),  # 400 padded to 448
    ],
    ids=lambda p: p.name,
)
def test_the_estimate_is_what_the_fused_graph_stores(checkpoint, profile, tmp_path):
    ckpt = Checkpoint(checkpoint)
    arch = architecture_for(ckpt.config)
    spec = arch.spec(ckpt.config)
    opts = dataclasses.replace(FusedOptions.for_profile(profile), gptq=False)  # same bytes, no calibration
    build_fused(ckpt, arch, spec, opts, tmp_path)
    stored = _stored_bytes(onnx.load(str(tmp_path / "model.onnx"), load_external_data=False))
    estimated = estimate_memory_mb(spec, profile)[0] * (1 << 20)
    assert estimated == pytest.approx(stored, abs=0.5)
