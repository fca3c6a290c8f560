"""The fused decoder graph: ONNX Runtime contrib ops, weights read straight from safetensors.

Graph inputs and outputs (KV cache laid out as GroupQueryAttention wants it, BNSH)::

    input_ids                     int64 [batch, seq]
    attention_mask                int64 [batch, total_seq]        1 for real tokens (right padding)
    past_key_values.{i}.key|value  T    [batch, kv_heads, past_seq, head_dim]
    -> logits                     fp32 [batch, seq, vocab]
    -> present.{i}.key|value       T    [batch, kv_heads, total_seq, head_dim]

Weights are read one at a time from the checkpoint, quantized if the profile asks (int4 / int8
MatMulNBits with its block size and accuracy level) and streamed into ``model.onnx.data``; the
builder never holds more than one layer's weights. Under int4 weights the embedding table and the
lm_head stay 8-bit (``head_int8``): on the trained test shapes an int4 embedding / lm_head cost
1-2 points of top-1 agreement, and at GLM-Edge-1.5B they are 8% of the weights; symmetric int4
scales come from a least-squares search per block (export/quant.py), and with the profile's
``quantizer = "gptq"`` the layer weights are rounded by GPTQ on calibration inputs
(export/gptq.py, export/calibration.py). ``int8_layers = N`` keeps the first N decoder layers'
linears at 8 bits: an error there passes through every later layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from edgeglm.errors import ExportError
from edgeglm.profiles import DeviceProfile
from export.architectures import Architecture, ArchSpec
from export.calibration import Calibration
from export.checkpoint import Checkpoint
from export.gptq import quantize_gptq
from export.onnx_writer import GraphWriter
from export.quant import quantize_blockwise

__all__ = ["FusedOptions", "build_fused", "row_block"]

MS = "com.microsoft"


@dataclass(frozen=True)
class _Quantized:
    """Initializer names of one blockwise-quantized weight, and its shape."""

    packed: str
    scales: str
    zeros: str  # "" when symmetric (the kernel's implicit zero point 2^(bits-1))
    n: int
    k: int
    bits: int
    block_size: int
    k_blocks: int
    zero_cols: int


@dataclass(frozen=True)
class FusedOptions:
    weights: str = "fp32"  # fp32 | fp16 | int8 | int4
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = False  # no zero points (export/quant.py): faster MatMulNBits at batch 1
    scale_search: bool = True  # symmetric int4: per-block least-squares scale search, not round-to-nearest
    head_int8: bool = True  # int4 weights: embedding table + lm_head at 8 bits (they decide every token)
    gptq: bool = False  # symmetric: layer weights by GPTQ on calibration inputs (export/gptq.py)
    int8_layers: int = 0  # int4 weights: the first N decoder layers' linears at 8 bits
    activations: str = "fp32"  # fp32 | fp16
    max_context: int = 2048
    rotary_interleaved: bool = True  # GLM: True. False exists to prove the quality gate catches it.

    @classmethod
    def for_profile(cls, profile: DeviceProfile, *, rotary_interleaved: bool = True) -> FusedOptions:
        """The options a device profile asks for (the exporter's and the benchmarks' one reading)."""
        fp16 = profile.weights == "fp16" or profile.kv_cache_dtype == "fp16"
        return cls(
            weights=profile.weights,
            block_size=profile.block_size or 32,
            accuracy_level=profile.accuracy_level,
            symmetric=bool(profile.symmetric_quant),
            # the 8-bit head was measured with the symmetric x86 kernels; an asymmetric (ARM) profile
            # keeps its 4-bit head: ONNX Runtime has 8-bit MatMulNBits kernels for ARM64 only since 1.23
            head_int8=bool(profile.symmetric_quant),
            scale_search=profile.quantizer != "rtn",
            gptq=profile.quantizer == "gptq",
            int8_layers=profile.int8_layers,
            activations="fp16" if fp16 else "fp32",
            max_context=profile.max_context,
            rotary_interleaved=rotary_interleaved,
        )


def row_block(block_size: int, k: int) -> int:
    """The block a row of ``k`` weights is stored in: ``block_size``, or, for a shorter row, the
    row's power of two (at least 16, MatMulNBits' smallest): the same scales, less padding."""
    return min(block_size, max(16, 1 << (k - 1).bit_length()))


class _Builder:
    def __init__(
        self,
        ckpt: Checkpoint,
        arch: Architecture,
        spec: ArchSpec,
        opts: FusedOptions,
        out: Path,
        calibration: Calibration | None = None,
    ) -> None:
        self.ckpt, self.arch, self.spec, self.opts = ckpt, arch, spec, opts
        self.calibration = calibration
        self.g = GraphWriter(out)
        self.np_dtype = np.float16 if opts.activations == "fp16" else np.float32
        self.elem = TensorProto.FLOAT16 if opts.activations == "fp16" else TensorProto.FLOAT

    def act(self, array: np.ndarray) -> np.ndarray:
        return array.astype(self.np_dtype)

    # ------------------------------------------------------------------------------------------
    def linear(
        self,
        name: str,
        weight: np.ndarray,
        bias: np.ndarray | None,
        x: str,
        head: bool = False,
        inputs: str = "",
    ) -> str:
        """y = x W^T (+ b) for an HF weight W [N, K].

        fp32/fp16:  x ──MatMul(Wᵀ [K, N])──(Add b)──> y
        int4/int8:  x ──MatMulNBits(B, scales, zero_points, bias; K, N, bits, block_size,
                                    accuracy_level)──> y

        ``inputs``: the checkpoint weight whose layer's calibration inputs ``x`` are (GPTQ).
        """
        if self.opts.weights in ("int4", "int8"):
            return self.quantized_linear(name, self.quantize(name, weight, head, inputs), bias, x)
        w_t = self.g.weight(f"{name}.weight_t", self.act(np.ascontiguousarray(weight.T)))
        y = self.g.node("MatMul", [x, w_t], [f"{name}/matmul"], f"{name}/MatMul")
        if bias is None:
            return y
        return self.g.node(
            "Add", [y, self.g.weight(f"{name}.bias", self.act(bias))], [f"{name}/out"], f"{name}/Add"
        )

    def quantize(self, name: str, weight: np.ndarray, head: bool = False, inputs: str = "") -> _Quantized:
        """Quantize W blockwise and stream B, scales and zero points into the data file.

        ``head`` (the embedding table and lm_head) is 8-bit under int4 weights with ``head_int8``.
        With ``gptq`` a layer weight (``inputs`` names its calibration) goes through GPTQ; the
        embedding table and lm_head keep the scale search (no calibration: the table is looked up,
        not multiplied, and the 8-bit head is near lossless).
        """
        bits = 4 if self.opts.weights == "int4" and not (head and self.opts.head_int8) else 8
        if bits == 4 and name.startswith("layers.") and int(name.split(".")[1]) < self.opts.int8_layers:
            bits = 8
        search = self.opts.scale_search and self.opts.symmetric and bits == 4
        block = row_block(self.opts.block_size, weight.shape[1])
        try:
            if self.opts.gptq and inputs:
                if self.calibration is None or inputs not in self.calibration:
                    raise ExportError(f"weight {name}", "GPTQ needs calibration inputs; none were collected")
                qw = quantize_gptq(weight, self.calibration.hessian(inputs), bits, block, search=bits == 4)
            else:
                qw = quantize_blockwise(weight, bits, block, symmetric=self.opts.symmetric, search=search)
        except ValueError as exc:  # NaN/inf weights, a singular Hessian: name the weight
            raise ExportError(f"weight {name}", str(exc)) from exc
        if inputs and self.calibration is not None:
            self.calibration.release(inputs)
        zeros = qw.zero_points
        return _Quantized(
            packed=self.g.weight(f"{name}.qweight", qw.packed),
            scales=self.g.weight(f"{name}.scales", self.act(qw.scales)),
            zeros="" if zeros is None else self.g.weight(f"{name}.qzeros", zeros),
            n=qw.n,
            k=qw.k,
            bits=qw.bits,
            block_size=qw.block_size,
            k_blocks=qw.packed.shape[1],
            zero_cols=0 if zeros is None else zeros.size // qw.n,
        )

    def quantized_linear(self, name: str, q: _Quantized, bias: np.ndarray | None, x: str) -> str:
        inputs = [x, q.packed, q.scales, q.zeros]  # A, B, scales, zero_points, g_idx, bias
        if bias is not None:
            inputs += ["", self.g.weight(f"{name}.bias", self.act(bias))]
        while not inputs[-1]:
            inputs.pop()
        return self.g.node(
            "MatMulNBits",
            inputs,
            [f"{name}/out"],
            name,
            MS,
            K=q.k,
            N=q.n,
            bits=q.bits,
            block_size=q.block_size,
            accuracy_level=self.opts.accuracy_level,
        )

    def embedding(self) -> tuple[str, _Quantized | None]:
        """fp32/fp16:  embed [V, H] ──Gather(input_ids)──> x
        int4/int8:  the same B / scales / zero points as a MatMulNBits weight, seen as
                    [V, H·bits/8] / [V, k_blocks] / [V, ⌈k_blocks·bits/8⌉] through Reshape
                    ──GatherBlockQuantized(bits, block_size)──> x
        A tied lm_head reuses that quantized table: the embedding costs no second copy.
        """
        g = self.g
        embed = self.ckpt.tensor(self.arch.embed)
        if self.opts.weights not in ("int4", "int8"):
            return g.node(
                "Gather",
                [g.weight("embed_tokens", self.act(embed)), "input_ids"],
                ["embed/out"],
                "embed/Gather",
            ), None
        q = self.quantize("embed_tokens", embed, head=True)
        del embed
        views = []
        for part, cols in (
            (q.packed, q.k_blocks * q.block_size * q.bits // 8),
            (q.scales, q.k_blocks),
            (q.zeros, q.zero_cols),
        ):
            if not part:  # symmetric: no zero points
                continue
            shape = g.const(f"{part}/shape2d", np.array([q.n, cols], np.int64))
            views.append(g.node("Reshape", [part, shape], [f"{part}/2d"], f"{part}/Reshape"))
        x = g.node(
            "GatherBlockQuantized",
            [views[0], "input_ids", *views[1:]],
            ["embed/out"],
            "embed/GatherBlockQuantized",
            MS,
            gather_axis=0,
            quantize_axis=1,
            block_size=q.block_size,
            bits=q.bits,
        )
        if q.k_blocks * q.block_size != q.k:  # padded columns: cut back to the hidden size
            x = g.node(
                "Slice",
                [
                    x,
                    g.const("embed/starts", np.array([0], np.int64)),
                    g.const("embed/ends", np.array([q.k], np.int64)),
                    g.const("embed/axes", np.array([-1], np.int64)),
                ],
                ["embed/sliced"],
                "embed/Slice",
            )
        return x, q

    def norm(self, name: str, weight_name: str, x: str) -> str:
        """x ──SimplifiedLayerNormalization(γ, ε)──> RMS-normalised x"""
        gamma = self.g.weight(f"{name}.gamma", self.act(self.ckpt.tensor(weight_name)))
        return self.g.node(
            "SimplifiedLayerNormalization",
            [x, gamma],
            [f"{name}/out"],
            name,
            axis=-1,
            epsilon=self.spec.rms_eps,
            stash_type=1,
        )

    def skip_norm(self, name: str, weight_name: str, x: str, residual: str) -> tuple[str, str]:
        """x, residual ──SkipSimplifiedLayerNormalization(γ)──> norm(x + residual), x + residual"""
        gamma = self.g.weight(f"{name}.gamma", self.act(self.ckpt.tensor(weight_name)))
        outs = [f"{name}/out", "", "", f"{name}/sum"]
        self.g.node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, gamma],
            outs,
            name,
            MS,
            epsilon=self.spec.rms_eps,
        )
        return outs[0], outs[3]

    # ------------------------------------------------------------------------------------------
    def preamble(self) -> tuple[str, str, str, str]:
        """attention_mask ──ReduceSum(axis 1)──Sub 1──Cast int32──> seqlens_k        [batch]
        attention_mask ──Shape──Gather 1──Cast int32──────────> total_sequence_length []
        rotary tables: cos_cache, sin_cache [max_context, rotary_dim / 2]
        """
        g, s = self.g, self.spec
        g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
        g.input("attention_mask", TensorProto.INT64, ["batch", "total_seq"])
        summed = g.node(
            "ReduceSum",
            ["attention_mask", g.const("axes_1", np.array([1], np.int64))],
            ["mask/sum"],
            "mask/ReduceSum",
            keepdims=0,
        )
        minus = g.node("Sub", [summed, g.const("one_i64", np.array(1, np.int64))], ["mask/sub"], "mask/Sub")
        seqlens = g.node("Cast", [minus], ["seqlens_k"], "mask/CastSeqlens", to=TensorProto.INT32)
        shape = g.node("Shape", ["attention_mask"], ["mask/shape"], "mask/Shape")
        total = g.node(
            "Gather",
            [shape, g.const("one_scalar", np.array(1, np.int64))],
            ["mask/total"],
            "mask/Gather",
            axis=0,
        )
        total32 = g.node("Cast", [total], ["total_seq_len"], "mask/CastTotal", to=TensorProto.INT32)
        half = s.rotary_dim // 2
        inv_freq = 1.0 / (s.rope_theta ** (np.arange(0, s.rotary_dim, 2, dtype=np.float64) / s.rotary_dim))
        freqs = np.outer(np.arange(self.opts.max_context, dtype=np.float64), inv_freq)[:, :half]
        cos = g.weight("cos_cache", self.act(np.cos(freqs)))
        sin = g.weight("sin_cache", self.act(np.sin(freqs)))
        return seqlens, total32, cos, sin

    def attention(self, i: int, h: str, seqlens: str, total: str, cos: str, sin: str) -> str:
        """h ──packed QKV linear (q ‖ k ‖ v, + bias)──> qkv [batch, seq, q + 2 kv]
        qkv, past_key_values.i.{key,value}, seqlens_k, total_sequence_length, cos, sin
            ──GroupQueryAttention(num_heads, kv_num_heads, rotary inside, interleaved)──> attn
                                                                  └──> present.i.{key,value}
        attn ──o_proj──> out   (glm4: ──SimplifiedLayerNormalization(post_self_attn_layernorm))
        """
        s, arch, ckpt, g = self.spec, self.arch, self.ckpt, self.g
        parts = [ckpt.tensor(arch.layer(i, f"self_attn.{p}_proj.weight")) for p in "qkv"]
        bias = None
        if s.attention_bias:
            bias = np.concatenate([ckpt.tensor(arch.layer(i, f"self_attn.{p}_proj.bias")) for p in "qkv"])
        q_name = arch.layer(i, "self_attn.q_proj.weight")  # q, k and v read the same inputs
        qkv = self.linear(f"layers.{i}.attn.qkv_proj", np.concatenate(parts), bias, h, inputs=q_name)
        del parts
        past_k = g.input(f"past_key_values.{i}.key", self.elem, ["batch", s.kv_heads, "past_seq", s.head_dim])
        past_v = g.input(
            f"past_key_values.{i}.value", self.elem, ["batch", s.kv_heads, "past_seq", s.head_dim]
        )
        present = [f"present.{i}.key", f"present.{i}.value"]
        for name in present:
            g.output(name, self.elem, ["batch", s.kv_heads, "total_seq", s.head_dim])
        attn = g.node(
            "GroupQueryAttention",
            [qkv, "", "", past_k, past_v, seqlens, total, cos, sin],
            [f"layers.{i}.attn/out", *present],
            f"layers.{i}.attn/GQA",
            MS,
            num_heads=s.heads,
            kv_num_heads=s.kv_heads,
            scale=float(s.head_dim**-0.5),
            do_rotary=1,
            rotary_interleaved=int(self.opts.rotary_interleaved),
            local_window_size=-1,
        )
        o_name = arch.layer(i, "self_attn.o_proj.weight")
        out = self.linear(f"layers.{i}.attn.o_proj", ckpt.tensor(o_name), None, attn, inputs=o_name)
        if s.extra_norms:
            out = self.norm(
                f"layers.{i}.post_self_attn_norm", arch.layer(i, "post_self_attn_layernorm.weight"), out
            )
        return out

    def mlp(self, i: int, h: str) -> str:
        """h ──gate_up_proj──Split──> gate, up;  up · (gate · σ(gate)) ──down_proj──> out
        (glm4: ──SimplifiedLayerNormalization(post_mlp_layernorm))
        """
        g, arch = self.g, self.arch
        gate_up_name = arch.layer(i, "mlp.gate_up_proj.weight")
        gate_up = self.linear(
            f"layers.{i}.mlp.gate_up_proj", self.ckpt.tensor(gate_up_name), None, h, inputs=gate_up_name
        )
        split = [f"layers.{i}.mlp/gate", f"layers.{i}.mlp/up"]
        g.node("Split", [gate_up], split, f"layers.{i}.mlp/Split", axis=-1, num_outputs=2)
        sig = g.node("Sigmoid", [split[0]], [f"layers.{i}.mlp/sigmoid"], f"layers.{i}.mlp/Sigmoid")
        silu = g.node("Mul", [split[0], sig], [f"layers.{i}.mlp/silu"], f"layers.{i}.mlp/SiLU")
        act = g.node("Mul", [split[1], silu], [f"layers.{i}.mlp/act"], f"layers.{i}.mlp/Mul")
        down_name = arch.layer(i, "mlp.down_proj.weight")
        down = self.ckpt.tensor(down_name)
        out = self.linear(f"layers.{i}.mlp.down_proj", down, None, act, inputs=down_name)
        if self.spec.extra_norms:
            out = self.norm(f"layers.{i}.post_mlp_norm", arch.layer(i, "post_mlp_layernorm.weight"), out)
        return out

    def build(self, progress: Callable[[int], None] | None) -> Path:
        """input_ids ──Gather(embed)──> x
        per layer:  norm(x) → attention → (+x) → norm → mlp → (+)   with the residual adds fused
                    into SkipSimplifiedLayerNormalization
        final:      SkipSimplifiedLayerNormalization(final norm) ──lm_head──> logits (fp32)
        """
        s, g, arch = self.spec, self.g, self.arch
        seqlens, total, cos, sin = self.preamble()
        x, embed_q = self.embedding()
        residual, out = x, x
        for i in range(s.layers):
            norm_weight = arch.layer(i, "input_layernorm.weight")
            if i == 0:
                h = self.norm("layers.0.input_norm", norm_weight, x)
            else:
                h, residual = self.skip_norm(f"layers.{i}.input_norm", norm_weight, out, residual)
            attn = self.attention(i, h, seqlens, total, cos, sin)
            post_norm = arch.layer(i, "post_attention_layernorm.weight")
            h, residual = self.skip_norm(f"layers.{i}.post_attn_norm", post_norm, attn, residual)
            out = self.mlp(i, h)
            if progress:
                progress(1)
        h, _ = self.skip_norm("final_norm", arch.final_norm, out, residual)
        if s.tied_embeddings and embed_q is not None:
            logits = self.quantized_linear("lm_head", embed_q, None, h)
        else:  # read again here: one big matrix in memory at a time
            logits = self.linear(
                "lm_head",
                self.ckpt.tensor(arch.embed if s.tied_embeddings else arch.lm_head),
                None,
                h,
                head=True,
            )
        if self.opts.activations == "fp16":
            logits = g.node("Cast", [logits], ["logits_fp32"], "lm_head/Cast", to=TensorProto.FLOAT)
        g.node("Identity", [logits], ["logits"], "logits/Identity")
        g.output("logits", TensorProto.FLOAT, ["batch", "seq", s.vocab])
        return g.save(f"edgeglm-{s.model_type}-fused")


def _check(spec: ArchSpec, opts: FusedOptions) -> None:
    """GroupQueryAttention's limits, said up front instead of failing inside ONNX Runtime."""
    if spec.head_dim % 16:
        raise ExportError(
            "fused graph", f"head_dim {spec.head_dim} must be a multiple of 16 for GroupQueryAttention"
        )
    if spec.rotary_dim % 16 or spec.rotary_dim > spec.head_dim:
        raise ExportError(
            "fused graph", f"rotary dim {spec.rotary_dim} must be a multiple of 16 and <= head_dim"
        )
    if spec.heads % spec.kv_heads:
        raise ExportError("fused graph", f"{spec.heads} heads are not a multiple of {spec.kv_heads} kv heads")
    if opts.weights in ("int4", "int8") and (opts.block_size < 16 or opts.block_size & (opts.block_size - 1)):
        raise ExportError("fused graph", f"block_size {opts.block_size} must be a power of two >= 16")
    if opts.gptq and not (opts.symmetric and opts.weights in ("int4", "int8")):
        raise ExportError("fused graph", "GPTQ writes symmetric int4/int8 weights only")
    if opts.int8_layers and opts.weights != "int4":
        raise ExportError(
            "fused graph", "int8_layers keeps layers of int4 weights at 8 bits: weights are not int4"
        )


def calibration_targets(arch: Architecture, spec: ArchSpec) -> list[str]:
    """The checkpoint weights whose layers' inputs GPTQ needs (q stands for the packed q, k, v)."""
    names = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    return [arch.layer(i, f"{n}.weight") for i in range(spec.layers) for n in names]


def build_fused(
    ckpt: Checkpoint,
    arch: Architecture,
    spec: ArchSpec,
    opts: FusedOptions,
    out_dir: Path,
    progress: Callable[[int], None] | None = None,
    calibration: Calibration | None = None,
) -> Path:
    """Write ``out_dir/model.onnx`` + ``model.onnx.data``; ``progress(1)`` after each layer.

    ``calibration`` (:func:`export.calibration.calibrate` over :func:`calibration_targets`) is
    required with ``opts.gptq``.
    """
    _check(spec, opts)
    if opts.gptq and calibration is None:
        raise ExportError("fused graph", "GPTQ quantization needs calibration inputs (export/calibration.py)")
    return _Builder(ckpt, arch, spec, opts, out_dir, calibration).build(progress)
