"""``edgectl export`` end to end on tiny *trained* GLM checkpoints (four shapes, cached per session).

Trained, not random: the quality gate's agreement metrics only mean something when the model's
next-token distributions are peaked. The gate runs on held-out prompts from the training domain,
as an operator would gate a real model on prompts from their own domain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from edgectl import root
from edgeglm.bundle import load_manifest
from edgeglm.errors import ExportError, ToleranceExceeded, UnavailableError
from edgeglm.keys import create_keypair, load_public_keys
from edgeglm.profiles import DeviceProfile, load_profile, profiles_dir
from export.architectures import ARCHITECTURES
from export.ort_runner import OrtDecoder
from export.pipeline import ExportResult, run_export
from export.spec import ExportSpec
from export.tiny_glm import SHAPES, heldout_prompts
from tests.derived_profiles import STANDARD_GRAPH, derived_profile

SHAPE_NAMES = sorted(SHAPES)


# The QDQ route has neither GPTQ nor 8-bit first layers: it keeps block 64 and the gate
# cpu-x86-int4 had before them (top-1 0.94, greedy 0.5, judged over both routes).
_STANDARD_INT4_GATE = {
    **load_profile("cpu-x86-int4").quality.model_dump(),
    "min_top1_agreement": 0.94,
    "min_greedy_prefix_agreement": 0.5,
}

# route/weights -> profile. fp32 routes keep the int8 profile's gate: parity is asserted directly.
PROFILES: dict[str, Callable[[], DeviceProfile]] = {
    "fused-fp32": lambda: derived_profile(
        "cpu-x86-int8",
        "t-fused-fp32",
        weights="fp32",
        block_size=None,
        accuracy_level=None,
        symmetric_quant=None,
    ),
    "standard-fp32": lambda: derived_profile(
        "cpu-x86-int8", "t-std-fp32", **STANDARD_GRAPH, weights="fp32", block_size=None
    ),
    "fused-int8": lambda: load_profile("cpu-x86-int8"),
    "fused-int4": lambda: load_profile("cpu-x86-int4"),
    "standard-int8": lambda: derived_profile("cpu-x86-int8", "t-std-int8", **STANDARD_GRAPH),
    "standard-int4": lambda: derived_profile(
        "cpu-x86-int4", "t-std-int4", **STANDARD_GRAPH, block_size=64, quality=_STANDARD_INT4_GATE
    ),
}


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory) -> tuple[Path, Path]:
    private, public, _ = create_keypair(tmp_path_factory.mktemp("keys"), "release")
    return private, public


@pytest.fixture(scope="session")
def eval_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(heldout_prompts()))
    return path


Exporter = Callable[..., ExportResult]


@pytest.fixture(scope="session")
def exported(tiny_checkpoints, signing_key, eval_prompts, tmp_path_factory) -> Exporter:
    """``exported(shape, variant) -> ExportResult``, each export made once per session."""
    root = tmp_path_factory.mktemp("bundles")
    done: dict[tuple[str, str], ExportResult] = {}

    def export(shape: str, variant: str) -> ExportResult:
        if (shape, variant) not in done:
            spec = ExportSpec(
                checkpoint=tiny_checkpoints(shape),
                profile=PROFILES[variant](),
                version="1.0.0",
                model_name=f"tiny-{shape}",
                out_dir=root / f"{shape}-{variant}",
                key_path=signing_key[0],
                eval_prompts=eval_prompts,
            )
            done[shape, variant] = run_export(spec)
        return done[shape, variant]

    return export


def _spec(tiny_checkpoints, signing_key, eval_prompts, out: Path, **over: Any) -> ExportSpec:
    fields: dict[str, Any] = {
        "checkpoint": tiny_checkpoints("glm-edge"),
        "profile": PROFILES["fused-int4"](),
        "version": "1.0.0",
        "model_name": "tiny",
        "out_dir": out,
        "key_path": signing_key[0],
        "eval_prompts": eval_prompts,
    } | over
    return ExportSpec(**fields)


def _greedy_without_cache(model: Any, ids: np.ndarray, n: int) -> list[int]:
    """transformers, recomputing the whole sequence per token: no cache code shared with anything."""
    seq = torch.from_numpy(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0, ids.shape[1] :].tolist()


def test_every_registered_architecture_has_a_tested_shape():
    assert {s.model_type for s in SHAPES.values()} >= set(ARCHITECTURES)
    assert {"glm", "glm4"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("route", ["fused", "standard"])
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_fp32_graphs_match_transformers(exported, tiny_checkpoints, eval_prompts, shape, route):
    result = exported(shape, f"{route}-fp32")
    q = result.quality
    assert q.passed, q.failures
    assert q.max_abs_logit_diff <= 1e-3
    assert q.top1_agreement == 1.0
    assert q.greedy_prefix_agreement == 1.0
    # 32 greedy tokens, stop tokens ignored, against transformers without a KV cache.
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoints(shape), dtype=torch.float32).eval()
    decoder = OrtDecoder(result.bundle / "model.onnx")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(result.bundle / "tokenizer.json"))
    for prompt in json.loads(eval_prompts.read_text())[:3]:
        ids = np.array([tok.encode(prompt).ids], np.int64)
        assert decoder.greedy(ids, 32)[0].tolist() == _greedy_without_cache(reference, ids, 32)


@pytest.mark.parametrize("variant", ["fused-int8", "fused-int4", "standard-int8", "standard-int4"])
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_quantized_exports_pass_their_profile_gates(exported, signing_key, shape, variant):
    result = exported(shape, variant)
    q = result.quality
    assert q.passed, q.failures
    gate = PROFILES[variant]().quality
    assert q.top1_agreement >= gate.min_top1_agreement
    assert q.greedy_prefix_agreement >= gate.min_greedy_prefix_agreement
    assert 0 < q.max_abs_logit_diff <= gate.max_abs_logit_diff  # quantized: never bit-exact
    manifest, _ = load_manifest(result.bundle, trusted=load_public_keys([signing_key[1]]))
    assert manifest.quality.passed is True
    assert manifest.quality.weights == variant.split("-")[1]
    assert manifest.quality.top1_agreement == q.top1_agreement


def test_int4_bundle_is_smaller_than_int8_and_fp32(exported):
    sizes = {
        v: exported("glm-edge", v).manifest.total_bytes() for v in ("fused-fp32", "fused-int8", "fused-int4")
    }
    assert sizes["fused-int4"] < sizes["fused-int8"] < sizes["fused-fp32"]


def test_manifest_carries_what_the_agent_needs(exported, tiny_checkpoints, signing_key):
    result = exported("glm-edge", "fused-int4")
    manifest, doc = load_manifest(result.bundle, trusted=load_public_keys([signing_key[1]]))
    names = {f.path for f in manifest.files}
    assert {
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
    } <= names
    assert "generation_config.json" in names
    layouts = {f.path: f.layout for f in manifest.files}
    assert layouts["model.onnx.data"] == "tensors"
    assert manifest.source_digest and manifest.source_digest.startswith("blake3:")
    kv_cache = manifest.runtime.kv_cache
    assert kv_cache is not None
    assert kv_cache.model_dump() == {"layers": 2, "kv_heads": 2, "head_dim": 16, "dtype": "fp32"}
    assert manifest.runtime.onnxruntime
    # what it was exported and gated with, less the keys only the exporter reads (an older agent
    # refuses unknown keys): how the weights were rounded is recorded under quality instead
    assert manifest.device_profile == PROFILES["fused-int4"]().serving()
    assert not {"quantizer", "int8_layers"} & doc["device_profile"].keys()
    assert doc["quality"]["quantizer"] == "gptq" and doc["quality"]["int8_layers"] == 1
    assert doc["quality"]["calibration"]["source"] == "self-generated"
    assert doc["quality"]["calibration"]["tokens"] == 16 * 128
    assert doc["quality"].keys() >= {
        "max_abs_logit_diff",
        "cosine",
        "top1_agreement",
        "kl",
        "greedy_prefix_agreement",
        "thresholds",
    }
    smoke = manifest.smoke_test
    assert smoke is not None and smoke.expected_tokens
    assert set(smoke.stop_tokens) == set(
        json.loads((tiny_checkpoints("glm-edge") / "generation_config.json").read_text())["eos_token_id"]
    )
    # The golden tokens are what the shipped graph produces for the shipped prompt.
    again = OrtDecoder(result.bundle / "model.onnx").greedy(
        np.array([smoke.prompt_tokens], np.int64), smoke.max_new_tokens, set(smoke.stop_tokens)
    )
    assert tuple(again[0].tolist()) == smoke.expected_tokens
    assert doc["smoke_test"]["prompt"] == smoke.prompt


@pytest.mark.parametrize(("shape", "variant"), [("glm-edge", "fused-fp32"), ("glm4-9b", "fused-int4")])
def test_wrong_rotary_layout_is_caught_by_the_gate(
    tiny_checkpoints, signing_key, eval_prompts, tmp_path, shape, variant
):
    out = tmp_path / "bundle"
    spec = _spec(
        tiny_checkpoints,
        signing_key,
        eval_prompts,
        out,
        checkpoint=tiny_checkpoints(shape),
        profile=PROFILES[variant](),
        rotary_interleaved=False,
    )
    with pytest.raises(ToleranceExceeded, match="failed the quality gate") as info:
        run_export(spec)
    assert "top1_agreement" in str(info.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind either


def test_force_writes_a_failing_bundle_marked_failed(tiny_checkpoints, signing_key, eval_prompts, tmp_path):
    out = tmp_path / "bundle"
    spec = _spec(tiny_checkpoints, signing_key, eval_prompts, out, rotary_interleaved=False, force=True)
    result = run_export(spec)
    assert not result.quality.passed
    manifest, _ = load_manifest(out, trusted=load_public_keys([signing_key[1]]))
    assert manifest.quality.passed is False
    assert manifest.quality.failures


def test_memory_budget_is_enforced_with_the_numbers(tiny_checkpoints, signing_key, eval_prompts, tmp_path):
    profile = derived_profile(
        "cpu-x86-int4", "t-small", memory_budget_mb=1, max_context=65536, max_batch_size=64
    )
    spec = _spec(tiny_checkpoints, signing_key, eval_prompts, tmp_path / "b", profile=profile)
    with pytest.raises(ExportError, match=r"needs an estimated [\d,]+ MB .* over the 1 MB memory budget"):
        run_export(spec)
    assert list(tmp_path.iterdir()) == []


def test_sharded_bf16_checkpoint_exports_like_the_reference(
    tiny_checkpoints, signing_key, eval_prompts, tmp_path
):
    ckpt = tiny_checkpoints("glm4-0414", save_dtype="bfloat16", shard_bytes=60_000)
    assert (ckpt / "model.safetensors.index.json").is_file()
    spec = _spec(
        tiny_checkpoints,
        signing_key,
        eval_prompts,
        tmp_path / "b",
        checkpoint=ckpt,
        profile=PROFILES["fused-fp32"](),
    )
    q = run_export(spec).quality
    assert q.max_abs_logit_diff <= 1e-3 and q.greedy_prefix_agreement == 1.0


def test_tensorrt_profile_without_a_gpu_says_so_before_building(
    tiny_checkpoints, signing_key, eval_prompts, tmp_path
):
    pytest.importorskip("onnx")
    try:
        from export.tensorrt_engine import probe

        probe()
    except UnavailableError:
        pass
    else:
        pytest.skip("a GPU with TensorRT is present: tests/unit/test_tensorrt_engine.py covers it")
    spec = _spec(
        tiny_checkpoints, signing_key, eval_prompts, tmp_path / "b", profile=load_profile("orin-nano-int4")
    )
    with pytest.raises(UnavailableError, match="TensorRT engine") as info:
        run_export(spec)
    assert "--no-engine" in info.value.hint
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_profile_with_no_engine_ships_the_gated_onnx_graph(
    tiny_checkpoints, signing_key, eval_prompts, tmp_path
):
    out = tmp_path / "b"
    spec = _spec(
        tiny_checkpoints,
        signing_key,
        eval_prompts,
        out,
        checkpoint=tiny_checkpoints("glm4-9b"),
        profile=load_profile("orin-nano-int4"),
        build_engine=False,
    )
    result = run_export(spec)
    assert result.quality.passed, result.quality.failures
    assert result.quality.engine is None
    manifest, _ = load_manifest(out, trusted=load_public_keys([signing_key[1]]))
    assert manifest.runtime.tensorrt_engine is None
    assert manifest.runtime.kv_cache.dtype == "fp16"
    # INT4 weights behind DequantizeLinear, dequantized straight to fp16 for a strongly typed network.
    decoder = OrtDecoder(out / "model.onnx")
    assert decoder.cache.dtype == np.float16
    assert not (out / "model.engine").exists()


# ---------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> Any:
    return CliRunner().invoke(root, list(args), catch_exceptions=False)


def test_cli_export_then_inspect(tiny_checkpoints, signing_key, eval_prompts, tmp_path):
    out = tmp_path / "bundle"
    res = _cli(
        "export",
        str(tiny_checkpoints("glm-gqa")),
        "--profile",
        "cpu-x86-int8",
        "--version",
        "2.1.0",
        "--key",
        str(signing_key[0]),
        "--out",
        str(out),
        "--eval-prompts",
        str(eval_prompts),
        "--dataset-version",
        "plant-logs-2026-11",
        "-o",
        "json",
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["passed"] is True and data["version"] == "2.1.0" and data["profile"] == "cpu-x86-int8"
    assert data["peak_rss_mb"] > 0 and data["weights_mb"] > 0
    res = _cli("export", "inspect", str(out), "-o", "json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["quality"]["passed"] is True
    assert info["smoke_test"]["expected_tokens"]
    assert {f["path"] for f in info["files"]} >= {"model.onnx", "model.onnx.data", "tokenizer.json"}
    res = _cli("export", "inspect", str(out))
    assert res.exit_code == 0 and "passed" in res.stdout
    res = _cli("bundle", "verify", str(out), "--trust", str(signing_key[1]))
    assert res.exit_code == 0, res.output


def test_cli_failed_gate_exits_1_and_writes_nothing(tiny_checkpoints, signing_key, tmp_path):
    # A profile file whose gate no int4 export can meet (bit-exact logits).
    text = (profiles_dir() / "cpu-x86-int4.toml").read_text()
    text = re.sub(r"^name = .*$", 'name = "t-strict"', text, flags=re.M)
    text = re.sub(r"^max_abs_logit_diff = .*$", "max_abs_logit_diff = 1e-6", text, flags=re.M)
    path = tmp_path / "t-strict.toml"
    path.write_text(text)
    out = tmp_path / "bundle"
    args = [str(tiny_checkpoints("glm-edge")), "--profile", str(path), "--version", "1.0.0"]
    res = _cli("export", *args, "--key", str(signing_key[0]), "--out", str(out))
    assert res.exit_code == 1
    error, hint = res.stderr.splitlines()[-2:]
    assert re.match(
        r"Error: export glm-edge-\w+@1\.0\.0 for t-strict: failed the quality gate: max_abs", error
    )
    assert hint.startswith("hint: ")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "code", "first"),
    [
        (["--version", "1.0"], 2, "Error: --version: '1.0' is not a semantic version"),
        (["--version", "1.0.0", "--profile", "no-such-profile"], 2, "Error:"),
    ],
)
def test_cli_bad_flags_are_usage_errors(tiny_checkpoints, signing_key, tmp_path, args, code, first):
    base = [str(tiny_checkpoints("glm-edge")), "--key", str(signing_key[0]), "--out", str(tmp_path / "b")]
    if "--profile" not in args:
        base += ["--profile", "cpu-x86-int4"]
    res = _cli("export", *base, *args)
    assert res.exit_code == code, res.output
    assert first in res.output


def test_cli_unsupported_architecture_names_the_supported_ones(signing_key, tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    res = _cli(
        "export", str(folder), "--profile", "cpu-x86-int4", "--version", "1.0.0", "--key", str(signing_key[0])
    )
    assert res.exit_code == 1
    assert "glm (GlmForCausalLM), glm4 (Glm4ForCausalLM)" in res.output
