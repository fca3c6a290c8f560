"""``edgectl export``: checkpoint -> graph -> quantize -> quality gate -> signed bundle.

    read config ─> architecture ─> memory estimate ─> (TensorRT: is there a GPU?) ─> (GPTQ:
    calibrate on the reference) ─> build graph (fused | standard) in a staging folder
    ─> (TensorRT: build the engine) ─> copy tokenizer files
    ─> quality gate vs transformers fp32 (graph, and engine) ─> golden smoke test ─> exact memory
    check ─> sign manifest ─> rename staging to the bundle folder

Nothing is left under the bundle's name unless the gate passed (or ``--force`` wrote it marked
failed); a failed or interrupted export removes its staging folder.
"""

from __future__ import annotations

import hashlib
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeglm.bundle import Manifest
from edgeglm.bundle_files import seal_folder
from edgeglm.errors import ConfigError, ConflictError, ExportError, ToleranceExceeded, UsageError
from edgeglm.keys import load_private_key
from edgeglm.profiles import DeviceProfile
from export.architectures import ArchSpec, architecture_for
from export.calibration import Calibration, calibrate
from export.checkpoint import Checkpoint
from export.fused import FusedOptions, build_fused, calibration_targets, row_block
from export.ort_runner import OrtDecoder
from export.quality import QualityReport, Reference, evaluate, load_prompts
from export.smoke import GPU_TOLERANCE_FLOOR, TOLERANCE_FLOOR, golden_smoke_test
from export.spec import ExportSpec

__all__ = ["ExportResult", "estimate_memory_mb", "run_export"]

Say = Callable[[str], None]
MIB = 1 << 20


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: Manifest
    quality: QualityReport
    seconds: float
    peak_rss_mb: float
    weights_mb: float
    memory_mb: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "model": self.manifest.model,
            "version": self.manifest.version,
            "profile": self.manifest.profile,
            "passed": self.quality.passed,
            "quality": self.quality.to_dict(),
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "weights_mb": round(self.weights_mb, 1),
            "memory_mb": round(self.memory_mb, 1),
        }


def _weight_bytes(profile: DeviceProfile, k: int, n: int, *, eight: bool = False) -> float:
    """Bytes of one ``[n, k]`` weight under ``profile`` (``eight``: kept at 8 bits under int4).

    Blockwise weights store a scale per block (4 bytes) and, asymmetric, a zero point (packed per
    row). MatMulNBits (the fused graph) stores each row as whole blocks: a block longer than the row
    is cut to the row's power of two (``export.fused``), and a row that is not a whole number of
    blocks is padded (GLM-4-9B's down projection, K = 13696 at block 256: 128 more columns a row).
    """
    if profile.weights in ("fp32", "fp16"):
        return n * k * (4.0 if profile.weights == "fp32" else 2.0)
    bits = 8 if eight or profile.weights == "int8" else 4
    block = profile.block_size or 32
    if profile.graph == "fused":
        block = row_block(block, k)
    blocks = -(-k // block)
    stored = blocks * block if profile.graph == "fused" else k
    zeros = 0 if profile.symmetric_quant else -(-blocks * bits // 8)  # packed: a row's bytes round up
    return n * (stored * bits / 8 + blocks * 4 + zeros)


def estimate_memory_mb(
    spec: ArchSpec, profile: DeviceProfile, weights_bytes: float | None = None
) -> tuple[float, float]:
    """(weights MB, total MB) for this profile: weights + KV cache at max_context x max_batch_size
    (+ the TensorRT workspace where the profile builds an engine)."""
    if weights_bytes is None:
        shapes = [  # (K, N) of each linear of a decoder layer
            (spec.hidden, spec.q_dim + 2 * spec.kv_dim),
            (spec.q_dim, spec.hidden),
            (spec.hidden, 2 * spec.intermediate),
            (spec.intermediate, spec.hidden),
        ]
        eight = min(profile.int8_layers, spec.layers)  # the first layers at 8 bits
        linear = sum(
            (spec.layers - eight) * _weight_bytes(profile, k, n)
            + eight * _weight_bytes(profile, k, n, eight=True)
            for k, n in shapes
        )
        act = 2 if profile.weights == "fp16" else 4
        # under int4 weights the lm_head stays at 8 bits (export.fused, export.quantize_qdq) unless
        # the fused graph is asymmetric: it moves top-1 the most
        head8 = profile.weights == "int4" and (profile.graph == "standard" or profile.symmetric_quant)
        head = _weight_bytes(profile, spec.hidden, spec.vocab, eight=head8)
        if profile.graph == "fused" and profile.weights in ("int4", "int8"):
            # one quantized table looked up by GatherBlockQuantized; a tied lm_head reads it too
            table = head * (1 if spec.tied_embeddings else 2)
        else:  # a float embedding table beside the lm_head
            table = head + spec.vocab * spec.hidden * act
        weights_bytes = linear + table
    kv_bytes = 2 if profile.kv_cache_dtype == "fp16" else 4
    kv = 2 * spec.layers * spec.kv_dim * profile.max_context * profile.max_batch_size * kv_bytes
    workspace = profile.tensorrt.workspace_mb * MIB if profile.tensorrt else 0
    prefix = profile.prefix_cache_mb * MIB
    return weights_bytes / MIB, (weights_bytes + kv + workspace + prefix) / MIB


def _check_budget(profile: DeviceProfile, weights_mb: float, total_mb: float, estimated: bool) -> None:
    if total_mb > profile.memory_budget_mb:
        how = "an estimated " if estimated else ""
        extras = f" + TensorRT workspace {profile.tensorrt.workspace_mb:,} MB" if profile.tensorrt else ""
        if profile.prefix_cache_mb:
            extras += f" + prefix cache {profile.prefix_cache_mb:,} MB"
        raise ExportError(
            f"profile {profile.name}",
            f"the bundle needs {how}{total_mb:,.0f} MB (weights {weights_mb:,.0f} MB + KV cache at "
            f"max_context {profile.max_context} x batch {profile.max_batch_size}{extras}), over the "
            f"{profile.memory_budget_mb:,} MB memory budget",
            hint="Pick a profile with smaller weights or a larger budget, or lower max_context.",
        )


def _quantizer(profile: DeviceProfile) -> str | None:
    """How the weights were rounded, for the manifest (None: not quantized, or QDQ's own)."""
    if profile.weights not in ("int4", "int8") or profile.graph != "fused":
        return None
    if profile.quantizer == "gptq":
        return "gptq"
    if profile.weights == "int4" and profile.symmetric_quant and profile.quantizer != "rtn":
        return "search"
    return "rtn"


def _calibrate(texts: list[str] | None, ckpt: Checkpoint, arch_spec: ArchSpec, say: Say) -> Calibration:
    say(f"calibrating GPTQ on {'--calibration' if texts else 'text the model samples itself'}")
    arch = architecture_for(ckpt.config)
    return calibrate(ckpt.folder, calibration_targets(arch, arch_spec), texts=texts)


def _build_graph(
    spec: ExportSpec,
    ckpt: Checkpoint,
    arch_spec: ArchSpec,
    staging: Path,
    say: Say,
    calibration: Calibration | None,
) -> Path:
    profile = spec.profile
    arch = architecture_for(ckpt.config)
    if profile.graph == "fused":
        from tqdm import tqdm

        opts = FusedOptions.for_profile(profile, rotary_interleaved=spec.rotary_interleaved)
        with tqdm(total=arch_spec.layers, desc="building fused graph", unit="layer", leave=False) as bar:
            return build_fused(
                ckpt, arch, arch_spec, opts, staging, progress=bar.update, calibration=calibration
            )
    from export.quantize_qdq import quantize_standard
    from export.standard import export_standard

    say("exporting the standard graph with optimum")
    raw = export_standard(ckpt.folder, staging / "fp32", model_type=arch.model_type, progress=say)
    if profile.weights == "fp32":
        for name in ("model.onnx", "model.onnx.data"):
            (raw.parent / name).replace(staging / name)
    else:
        activations = "fp16" if profile.kv_cache_dtype == "fp16" else "fp32"
        say(f"quantizing to {profile.weights} weights, {activations} activations")
        quantize_standard(
            raw,
            staging,
            weights=profile.weights,
            block_size=profile.block_size or 32,
            activations=activations,
        )
    shutil.rmtree(staging / "fp32", ignore_errors=True)
    return staging / "model.onnx"


def _wants_engine(spec: ExportSpec) -> bool:
    return spec.profile.runtime == "tensorrt" and spec.build_engine


def _build_engine(spec: ExportSpec, model_path: Path, say: Say) -> tuple[dict[str, Any], Any]:
    """The TensorRT engine beside the graph: (its manifest record, its teacher-forced logits)."""
    from export.tensorrt_engine import EngineRunner, build_engine

    assert spec.profile.tensorrt is not None  # the profile schema requires it for runtime tensorrt
    say(f"building the TensorRT engine ({spec.profile.tensorrt.precision})")
    info = build_engine(model_path, model_path.parent, spec.profile.tensorrt)
    return info.to_dict(), EngineRunner(model_path.parent / info.file).logits


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer.encode(text).ids
    if not ids:
        raise ExportError("eval prompt", f"{text[:40]!r} encodes to no tokens")
    return ids


def run_export(spec: ExportSpec, say: Say = lambda _: None) -> ExportResult:
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    profile = spec.profile
    gptq = profile.graph == "fused" and profile.quantizer == "gptq"
    if spec.calibration is not None and not gptq:
        raise UsageError(
            "--calibration", f'profile {profile.name} does not calibrate (only quantizer = "gptq" does)'
        )
    ckpt = Checkpoint(spec.checkpoint)
    arch_spec = architecture_for(ckpt.config).spec(ckpt.config)
    weights_mb, total_mb = estimate_memory_mb(arch_spec, profile)
    _check_budget(profile, weights_mb, total_mb, estimated=True)
    if spec.out_dir.exists():
        raise ConflictError(f"bundle folder {spec.out_dir}", "already exists", hint="Choose another --out.")
    tokenizer_path = ckpt.folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ExportError(f"checkpoint {ckpt.folder}", "has no tokenizer.json (the agent needs it)")
    key = load_private_key(spec.key_path)
    prompts = load_prompts(spec.eval_prompts)
    texts, texts_sha = None, None
    if spec.calibration is not None:  # read once: the digest recorded is of the text calibrated on
        try:
            raw = spec.calibration.read_bytes()
        except OSError as exc:
            raise ConfigError(f"calibration text {spec.calibration}", f"cannot be read: {exc}") from exc
        texts_sha = hashlib.sha256(raw).hexdigest()
        texts = load_prompts(spec.calibration, what="calibration text", raw=raw)
    if _wants_engine(spec):  # before minutes of graph building, not after
        from export.tensorrt_engine import probe

        gpu = probe()
        say(f"TensorRT {gpu.tensorrt} engine for {gpu.name} (compute capability {gpu.compute_capability})")

    staging = spec.out_dir.with_name(f".{spec.out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shape = f"{arch_spec.layers} layers, hidden {arch_spec.hidden}"
        say(f"{arch_spec.model_type}: {shape}, route {profile.graph}")
        calibration = _calibrate(texts, ckpt, arch_spec, say) if gptq else None
        calibrated = None if calibration is None else calibration.to_dict()
        if calibrated is not None and texts_sha is not None:
            calibrated["file_sha256"] = texts_sha
        model_path = _build_graph(spec, ckpt, arch_spec, staging, say, calibration)
        del calibration
        engine_record, engine = _build_engine(spec, model_path, say) if _wants_engine(spec) else (None, None)
        for path in [ckpt.folder / "config.json", *ckpt.tokenizer_files()]:
            shutil.copy2(path, staging / path.name)

        say("quality gate: comparing with the transformers fp32 reference")
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        decoder = OrtDecoder(model_path)
        reference = Reference(ckpt.folder)
        stop = ckpt.stop_tokens()
        report = evaluate(
            reference,
            decoder,
            [_encode(tokenizer, p) for p in prompts],
            profile.quality,
            new_tokens=spec.new_tokens,
            stop_tokens=stop,
            engine=engine,
        )
        del reference
        if not report.passed and not spec.force:
            raise ToleranceExceeded(
                f"export {spec.model_name}@{spec.version} for {profile.name}",
                "failed the quality gate: " + "; ".join(report.failures),
                metrics=report.to_dict(),
            )
        say("golden smoke test: tokens, logits and the tolerance the kernels need")
        on_gpu = profile.execution_providers[0] != "CPUExecutionProvider"
        smoke = golden_smoke_test(
            decoder,
            spec.smoke_prompt,
            _encode(tokenizer, spec.smoke_prompt),
            spec.smoke_tokens,
            set(stop),
            floor=GPU_TOLERANCE_FLOOR if on_gpu else TOLERANCE_FLOOR,
        )
        del decoder

        del engine
        weights_bytes = (staging / "model.onnx.data").stat().st_size
        weights_mb, total_mb = estimate_memory_mb(arch_spec, profile, weights_bytes)
        _check_budget(profile, weights_mb, total_mb, estimated=False)

        import onnxruntime

        say("signing the bundle")
        manifest, _ = seal_folder(
            staging,
            key,
            model=spec.model_name,
            version=spec.version,
            profile=profile.name,
            piece_bytes=profile.chunk.tensor_piece_bytes,
            cdc_avg_bytes=profile.chunk.cdc_avg_bytes,
            source_digest=ckpt.digest(),
            dataset_version=spec.dataset_version,
            quality={
                **report.to_dict(),
                "route": profile.graph,
                "weights": profile.weights,
                "block_size": profile.block_size,
                "symmetric": profile.symmetric_quant,
                "quantizer": _quantizer(profile),
                "int8_layers": profile.int8_layers,
                "calibration": calibrated,
            },
            runtime={
                "onnxruntime": onnxruntime.__version__,
                "graph": profile.graph,
                "execution_providers": list(profile.execution_providers),
                "architecture": arch_spec.model_type,
                "kv_cache": {
                    "layers": arch_spec.layers,
                    "kv_heads": arch_spec.kv_heads,
                    "head_dim": arch_spec.head_dim,
                    "dtype": profile.kv_cache_dtype,
                },
                "tensorrt_engine": engine_record,
                "memory_mb": round(total_mb, 1),
            },
            smoke_test=smoke,
            device_profile=profile.serving(),  # how weights were rounded is in quality, above
        )
        staging.rename(spec.out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    return ExportResult(
        bundle=spec.out_dir,
        manifest=manifest,
        quality=report,
        seconds=time.perf_counter() - t0,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        weights_mb=weights_mb,
        memory_mb=total_mb,
    )
