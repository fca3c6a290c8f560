"""The typed ``quality`` and ``runtime`` sections of a bundle manifest (PRODUCT.md sections 4, 5, 11).

    quality   what the export's quality gate measured against the fp32 reference, its thresholds,
              failures and verdict (``passed``), and the quantization it judged
    runtime   what the bundle needs to run: its graph route, execution providers, architecture, KV
              cache shape, ONNX Runtime version, TensorRT engine, estimated memory

The exporter writes them, the hub's registry reads ``quality`` to refuse an ungated bundle, and the
agent reads ``runtime`` to open the graph. Every field is optional: a bundle written before a field
existed still loads, and a section serialises exactly the fields it was given (plus any it does not
know, kept as they came), so a manifest's canonical form, and so its digest, does not change when
it passes through these types.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

__all__ = ["EngineRecord", "KvCacheShape", "QualitySection", "RuntimeSection"]

Graph = Literal["fused", "standard"]
Weights = Literal["fp32", "fp16", "int8", "int4"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        given = self.model_fields_set | set(self.model_extra or {})
        return {k: v for k, v in out.items() if k in given}

    @property
    def empty(self) -> bool:
        """Nothing was recorded (a bundle sealed without this section)."""
        return not self.model_fields_set and not self.model_extra


class QualitySection(_Section):
    passed: bool | None = None
    failures: tuple[str, ...] = ()
    thresholds: dict[str, float] = Field(default_factory=dict)
    max_abs_logit_diff: float | None = None
    cosine: float | None = None
    cosine_min: float | None = None
    top1_agreement: float | None = None
    kl: float | None = None
    greedy_prefix_agreement: float | None = None
    prompts: int | None = Field(default=None, ge=0)
    new_tokens: int | None = Field(default=None, ge=0)
    engine: dict[str, float] | None = None  # the TensorRT engine's own teacher-forced metrics
    route: Graph | None = None
    weights: Weights | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    quantizer: Literal["rtn", "search", "gptq"] | None = None  # how the weights were rounded
    int8_layers: int | None = Field(default=None, ge=0)  # first decoder layers kept at 8 bits
    calibration: dict[str, Any] | str | None = None  # GPTQ: {method, tokens, source[, file_sha256]}


class KvCacheShape(_Section):
    layers: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    dtype: Literal["fp32", "fp16"]


class EngineRecord(_Section):
    """The TensorRT engine built beside the graph, and the GPU it was built for."""

    file: str = Field(min_length=1, max_length=512)
    bytes: int = Field(ge=0)
    seconds: float | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    tensorrt: str | None = None
    precision: str | None = None
    profiles: tuple[dict[str, Any], ...] = ()


class RuntimeSection(_Section):
    graph: Graph | None = None
    execution_providers: tuple[str, ...] = ()
    architecture: str | None = Field(default=None, max_length=64)
    kv_cache: KvCacheShape | None = None
    onnxruntime: str | None = Field(default=None, max_length=64)
    tensorrt_engine: EngineRecord | None = None
    memory_mb: float | None = Field(default=None, ge=0)
