"""TensorRT engines: optimisation-profile shapes (anywhere) and real engine builds (GPU only).

The ``gpu`` tests build engines with the TensorRT Python API from tiny trained checkpoints and
hold them to the profile's gate; where no NVIDIA GPU with TensorRT is present they skip and say
why. CI has no GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeglm.bundle import load_manifest
from edgeglm.errors import UnavailableError
from edgeglm.keys import create_keypair, load_public_keys
from edgeglm.profiles import TensorRTSettings, load_profile
from export.pipeline import run_export
from export.spec import ExportSpec
from export.tensorrt_engine import ENGINE_NAME, GpuInfo, _profile_shapes, probe
from export.tiny_glm import heldout_prompts

SETTINGS = TensorRTSettings(
    precision="int4-weight-only", min_batch=1, opt_batch=2, max_batch=4, opt_seq=256, max_seq=1024
)


def test_prefill_profile_has_an_empty_past_and_decode_one_new_token():
    past = _profile_shapes("past_key_values.3.key", (-1, 2, -1, 64), SETTINGS)
    assert past[0] == ((1, 2, 0, 64), (2, 2, 0, 64), (4, 2, 0, 64))
    assert past[1] == ((1, 2, 1, 64), (2, 2, 256, 64), (4, 2, 1023, 64))
    ids = _profile_shapes("input_ids", (-1, -1), SETTINGS)
    assert ids == [((1, 1), (2, 256), (4, 1024)), ((1, 1), (2, 1), (4, 1))]
    mask = _profile_shapes("attention_mask", (-1, -1), SETTINGS)
    assert mask[1] == ((1, 2), (2, 257), (4, 1024))  # past + 1, never beyond max_seq
    assert _profile_shapes("position_ids", (-1, -1), SETTINGS) == ids


@pytest.fixture(scope="module")
def gpu() -> GpuInfo:
    try:
        return probe()
    except UnavailableError as exc:
        pytest.skip(f"no TensorRT GPU here: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize(("profile", "shape"), [("orin-nano-int4", "glm4-9b"), ("orin-agx-fp16", "glm-edge")])
def test_engine_is_built_gated_and_recorded(gpu, tiny_checkpoints, tmp_path, profile, shape):
    private, public, _ = create_keypair(tmp_path / "keys", "release")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(heldout_prompts()))
    out = tmp_path / "bundle"
    spec = ExportSpec(
        checkpoint=tiny_checkpoints(shape),
        profile=load_profile(profile),
        version="1.0.0",
        model_name="tiny",
        out_dir=out,
        key_path=private,
        eval_prompts=prompts,
    )
    result = run_export(spec)
    assert result.quality.passed, result.quality.failures
    assert result.quality.engine is not None
    assert result.quality.engine["top1_agreement"] >= spec.profile.quality.min_top1_agreement
    manifest, _ = load_manifest(out, trusted=load_public_keys([public]))
    engine = manifest.runtime.tensorrt_engine
    assert engine is not None
    assert engine.tensorrt == gpu.tensorrt
    assert engine.compute_capability == gpu.compute_capability
    assert [p["name"] for p in engine.profiles] == ["prefill", "decode"]
    assert Path(out / ENGINE_NAME).stat().st_size == engine.bytes
    assert ENGINE_NAME in {f.path for f in manifest.files}
