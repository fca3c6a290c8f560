"""Supported architectures: one small class per ``model_type``, registered by a decorator.

An architecture turns a Hugging Face ``config.json`` into an :class:`ArchSpec` — the numbers a
graph builder needs — and names the checkpoint's weights. Adding a GLM variant is a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgeglm.errors import ExportError, UnsupportedModel

__all__ = ["ARCHITECTURES", "ArchSpec", "Architecture", "architecture_for", "register"]


@dataclass(frozen=True)
class ArchSpec:
    """Everything about a decoder's shape that the graph depends on."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rotary_dim: int
    rope_theta: float
    rms_eps: float
    attention_bias: bool
    tied_embeddings: bool
    extra_norms: bool  # glm4: post_self_attn_layernorm and post_mlp_layernorm
    max_positions: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


class Architecture:
    """Base: GLM-family decoders. Subclasses set what differs."""

    model_type: ClassVar[str]
    hf_class: ClassVar[str]
    extra_norms: ClassVar[bool] = False

    def spec(self, config: dict[str, Any]) -> ArchSpec:
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or hidden // heads)
            rotary_dim = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
            if config.get("rope_scaling"):
                raise UnsupportedModel(
                    f"{self.model_type} checkpoint",
                    f"rope_scaling {config['rope_scaling']!r} is not supported yet",
                )
            return ArchSpec(
                model_type=self.model_type,
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                rotary_dim=rotary_dim,
                rope_theta=float(config.get("rope_theta", 10000.0)),
                rms_eps=float(config.get("rms_norm_eps", 1e-5)),
                attention_bias=bool(config.get("attention_bias", False)),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                extra_norms=self.extra_norms,
                max_positions=int(config.get("max_position_embeddings", 8192)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{self.model_type} config.json", f"missing or bad field: {exc}") from exc

    # Weight names, as transformers writes them.
    embed = "model.embed_tokens.weight"
    final_norm = "model.norm.weight"
    lm_head = "lm_head.weight"

    @staticmethod
    def layer(i: int, part: str) -> str:
        return f"model.layers.{i}.{part}"


ARCHITECTURES: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    ARCHITECTURES[cls.model_type] = cls()
    return cls


@register
class Glm(Architecture):
    """GlmForCausalLM: GLM-Edge 1.5B/4B, GLM-4-9B-chat-hf (partial rotary, optional QKV bias)."""

    model_type = "glm"
    hf_class = "GlmForCausalLM"


@register
class Glm4(Architecture):
    """Glm4ForCausalLM: GLM-4-0414, with extra norms after attention and after the MLP."""

    model_type = "glm4"
    hf_class = "Glm4ForCausalLM"
    extra_norms = True


def architecture_for(config: dict[str, Any]) -> Architecture:
    model_type = str(config.get("model_type", ""))
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        supported = ", ".join(f"{a.model_type} ({a.hf_class})" for a in ARCHITECTURES.values())
        raise UnsupportedModel(
            f"model_type {model_type or '(none)'!r}",
            f"not supported; supported: {supported}",
            hint="Export a GLM-family checkpoint (GLM-Edge, GLM-4-9B-chat-hf, GLM-4-0414).",
        )
    return arch
