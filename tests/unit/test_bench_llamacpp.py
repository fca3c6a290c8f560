"""The llama.cpp anchor's arithmetic and bookkeeping (bench/llamacpp.py and its helpers), no build.

Ratios are medians of same-round pairs, the roofline is bandwidth over bytes per token, bytes per
token come from the ONNX graph and the GGUF tensor table, and the converter patch only answers
where llama.cpp would refuse our tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import llamacpp
from bench.anchor_build import Build, flags_hash
from bench.anchor_engine import parse_variant
from bench.cpu_share import CpuTimes, foreign_cpu_s
from bench.gguf_convert import GLM_PRE_TOKENIZER, no_bos_without_token, patch_pre_tokenizer
from bench.membw import roofline_tok_s, share_of_roofline
from bench.weights_read import gguf_read_bytes, onnx_initializers, onnx_read_bytes


def test_pair_ratios_pair_within_rounds_and_skip_failed_runs() -> None:
    rounds = [
        {"ours": 15.0, "theirs": 20.0},
        {"ours": 18.0},  # llama.cpp failed this round: no pair
        {"ours": 16.0, "theirs": 16.0},
        {"ours": 12.0, "theirs": 10.0},
    ]
    ratios = llamacpp.pair_ratios(rounds, "ours", "theirs")
    assert ratios == [0.75, 1.0, 1.2]
    assert llamacpp.summarize(ratios) == {"median": 1.0, "min": 0.75, "max": 1.2, "n": 3}
    assert llamacpp.summarize([]) is None


def test_median_of_pair_ratios_is_not_ratio_of_medians() -> None:
    # a slow round hits both sides of its pair: the pair ratio cancels it, medians of sides do not
    rounds = [{"a": 10.0, "b": 10.0}, {"a": 5.0, "b": 10.0}, {"a": 10.0, "b": 5.0}]
    assert llamacpp.summarize(llamacpp.pair_ratios(rounds, "a", "b"))["median"] == 1.0  # type: ignore[index]
    rounds = [{"a": 20.0, "b": 10.0}, {"a": 8.0, "b": 4.0}, {"a": 10.0, "b": 5.0}]
    assert llamacpp.summarize(llamacpp.pair_ratios(rounds, "a", "b"))["median"] == 2.0  # type: ignore[index]


def test_roofline_arithmetic() -> None:
    # the numbers: 0.92 GB per token at 25.6 GB/s is at most 27.8 tok/s
    assert roofline_tok_s(920_000_000, 25.6) == pytest.approx(27.83, abs=0.01)
    assert share_of_roofline(15.4, 920_000_000, 25.6) == pytest.approx(0.553, abs=0.001)
    with pytest.raises(ValueError):
        roofline_tok_s(0, 25.6)


def test_gguf_bytes_count_a_tied_embedding_and_skip_an_untied_one() -> None:
    tied = [("token_embd.weight", 1000), ("blk.0.attn_q.weight", 300), ("output_norm.weight", 8)]
    assert gguf_read_bytes(tied) == 1308  # token_embd is the output matrix too: read every token
    untied = [*tied, ("output.weight", 900)]
    assert gguf_read_bytes(untied) == 300 + 8 + 900  # the embedding is only a row lookup


def test_onnx_bytes_skip_row_lookups_only() -> None:
    inits = [
        ("embed", 1000, frozenset({"GatherBlockQuantized", "MatMulNBits"})),  # tied: lm_head reads it
        ("cos_cache", 50, frozenset({"GroupQueryAttention"})),
        ("untied_embed", 700, frozenset({"Gather"})),
        ("q_proj", 300, frozenset({"MatMulNBits"})),
        ("unused", 5, frozenset()),
    ]
    assert onnx_read_bytes(inits) == 1000 + 300 + 5


def test_onnx_initializers_read_the_graph_through_reshape(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper, save_model

    def init(name: str, n: int) -> TensorProto:
        return numpy_helper.from_array(np.zeros(n, np.uint8), name)

    nodes = [
        helper.make_node("Reshape", ["embed", "shape"], ["embed2d"]),
        helper.make_node("GatherBlockQuantized", ["embed2d", "ids"], ["x"], domain="com.microsoft"),
        helper.make_node("MatMulNBits", ["x", "proj"], ["y"], domain="com.microsoft"),
        helper.make_node("GroupQueryAttention", ["y", "cos"], ["z"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
        initializer=[init("embed", 64), init("proj", 32), init("cos", 16), init("shape", 2)],
    )
    save_model(helper.make_model(graph), str(tmp_path / "m.onnx"))
    found = {name: (size, ops) for name, size, ops in onnx_initializers(tmp_path / "m.onnx")}
    assert found["embed"] == (64, frozenset({"GatherBlockQuantized"}))  # seen through the Reshape
    assert found["cos"] == (16, frozenset({"GroupQueryAttention"}))
    # untied embedding and RoPE cache are row lookups; the projection and the shape constant count
    assert onnx_read_bytes([(n, *v) for n, v in found.items()]) == 32 + 2


def test_gguf_tensor_table_from_a_real_file(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")  # the bench extra
    from bench.weights_read import gguf_tensors

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((16, 4), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    table = dict(gguf_tensors(tmp_path / "m.gguf"))
    assert table == {"token_embd.weight": 128, "blk.0.ffn_up.weight": 128}


class _Converter:
    """Stands in for llama.cpp's TextModel: knows one hash, refuses the rest."""

    def __init__(self, known: bool) -> None:
        self.known = known

    def get_vocab_base_pre(self, tokenizer: object) -> str:
        if self.known:
            return "llama-bpe"
        raise NotImplementedError("BPE pre-tokenizer was not recognized")


def test_pre_tokenizer_patch_answers_only_where_llama_cpp_refuses() -> None:
    cls = type("TextModel", (_Converter,), {})
    patch_pre_tokenizer(cls)
    patch_pre_tokenizer(cls)  # twice is once
    assert cls(known=True).get_vocab_base_pre(None) == "llama-bpe"
    assert cls(known=False).get_vocab_base_pre(None) == GLM_PRE_TOKENIZER == "chatglm-bpe"
    assert not getattr(_Converter.get_vocab_base_pre, "_edgeglm_patched", False)  # the base is untouched


def test_add_bos_is_cleared_only_without_a_bos_token() -> None:
    # llama-bench starts with the BOS token when add_bos is set: without one it aborts
    assert no_bos_without_token({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.eos_token_id": 1})
    assert not no_bos_without_token({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 2})
    assert not no_bos_without_token({"tokenizer.ggml.add_bos_token": False})
    assert not no_bos_without_token({})


def test_variants_are_checked_before_any_round() -> None:
    assert parse_variant("spin=0,dyn_block=4") == {"spin": "0", "dyn_block": "4"}
    with pytest.raises(ValueError, match="unknown variant key 'spinning'"):
        parse_variant("spinning=0")
    with pytest.raises(ValueError, match="not key=value"):
        parse_variant("spin")
    assert llamacpp.parse_variant_arg("decode:int4:acc=0") == ("decode", "int4", "acc=0")
    for bad in ("decode:int3:spin=0", "train:int4:spin=0", "decode:int4"):
        with pytest.raises(ValueError):
            llamacpp.parse_variant_arg(bad)


def test_foreign_cpu_is_busy_time_minus_our_own() -> None:
    assert foreign_cpu_s(CpuTimes(100.0, 0.0), CpuTimes(130.0, 0.0), own_cpu_s=20.0) == 10.0
    assert foreign_cpu_s(CpuTimes(100.0, 0.0), CpuTimes(110.0, 0.0), own_cpu_s=12.0) == 0.0  # clock skew


def test_build_flavours_hash_their_flags() -> None:
    assert flags_hash("native") != flags_hash("avx512")
    with pytest.raises(ValueError, match="unknown llama"):
        flags_hash("cuda")


def _setup() -> llamacpp.Setup:
    native = Build("native", "0.3.36", Path("/src"), Path("/bin"))
    s = llamacpp.Setup(native, native, "native", {}, {})
    s.bytes_per_token = {"int4": 1_000_000_000, "int8": 2_000_000_000, "Q4_0": 900_000_000}
    s.bytes_per_token |= {"Q4_K_M": 1_000_000_000, "Q8_0": 1_800_000_000}
    return s


def _res(value_key: str, value: float, bw: float = 20.0, **extra: float) -> dict[str, object]:
    return {value_key: value, "value": value_key, "bw_before": {"median_gb_s": bw}, **extra}


def test_summary_pairs_rounds_and_puts_decode_against_the_roofline() -> None:
    rounds = [
        {
            "decode:Q4_0": _res("tok_s", 20.0),
            "decode:int4": _res("tok_s", 16.0),
            "decode:Q4_K_M": _res("tok_s", 14.0),
            "decode:Q8_0": _res("tok_s", 10.0),
            "decode:int8": _res("tok_s", 9.0),
            "e2e:Q4_0": _res("gen_tok_s_8", 24.0, gen_tok_s_1=12.0),
            "e2e:int4": _res(
                "gen_tok_s_8_cache_off", 30.0, gen_tok_s_8_cache_on=36.0, gen_tok_s_1_cache_off=12.0
            ),
            "decode:int4@spin=0": _res("tok_s", 12.0),
        }
    ]
    variants = [("decode", "int4", "spin=0")]
    summ = llamacpp.summary(_setup(), rounds, variants)
    assert summ["decode:int4/Q4_0"]["median"] == 0.8
    assert summ["decode:int8/Q8_0"]["median"] == 0.9
    assert summ["e2e:int4-8-cache-off/Q4_0-8"]["median"] == 1.25
    assert summ["e2e:int4-8-cache-on/Q4_0-8"]["median"] == 1.5
    assert summ["e2e:int4:8v1"]["median"] == 2.5 and summ["e2e:Q4_0:8v1"]["median"] == 2.0
    assert summ["roofline:int4"]["median"] == 0.8  # 16 tok/s x 1 GB at 20 GB/s
    assert summ["roofline:int8"]["median"] == 0.9
    assert summ["lever:decode:int4@spin=0"]["median"] == 0.75
    assert summ["prefill:int4/Q4_0"] is None  # not measured: no ratio, not a zero
    text = llamacpp.table(_setup(), summ)
    assert "| int4 decode >= 1.15x llama.cpp Q4_0 | 0.80 (0.80-0.80) | no |" in text
    assert "| 8 clients over 1, each engine its own | 2.00 (2.00-2.00) | 2.50 (2.50-2.50) | |" in text
    assert "| decode:int4@spin=0 | 0.75 (0.75-0.75) |" in text


def test_the_roofline_takes_the_larger_probe_and_skips_a_run_whose_bandwidth_changed_phase() -> None:
    """Probes before and after each run: the larger one is the roofline (a phase change during the
    run must not flatter it); probes more than 15% apart leave that run out of the share only."""
    assert llamacpp.steady_bandwidth(20.0, 22.0) == 22.0
    assert llamacpp.steady_bandwidth(20.0, None) == 20.0  # a results file from before the second probe
    assert llamacpp.steady_bandwidth(30.0, 50.0) is None

    def decode(tok_s: float, before: float, after: float) -> dict[str, object]:
        return _res("tok_s", tok_s, before) | {"bw_after": {"median_gb_s": after}}

    rounds = [
        {"decode:int8": decode(9.0, 20.0, 22.5), "decode:Q8_0": decode(10.0, 20.0, 20.0)},
        {"decode:int8": decode(14.0, 20.0, 35.0), "decode:Q8_0": decode(10.0, 20.0, 20.0)},  # phase change
    ]
    summ = llamacpp.summary(_setup(), rounds, [])
    assert summ["roofline:int8"] == {"median": 0.8, "min": 0.8, "max": 0.8, "n": 1}  # 9 x 2 GB / 22.5
    assert summ["decode:int8/Q8_0"]["n"] == 2  # the ratio of the same round still counts


def test_a_lever_runs_next_to_the_unchanged_engine_in_the_same_round() -> None:
    import argparse

    args = argparse.Namespace(threads=2, llama_threads=None, repeats=1, only=["decode", "prefill"])
    variants = [llamacpp.parse_variant_arg(v) for v in ("decode:int4:spin=0", "e2e:int4:threads=1")]
    keys = [[step.key for step in group] for group in llamacpp.plan(_setup(), args, variants)]
    assert keys == [
        ["decode:Q4_0", "decode:int4", "decode:int4@spin=0"],
        ["decode:Q4_K_M"],
        ["decode:Q8_0", "decode:int8"],
        ["prefill:Q4_0", "prefill:int4"],
        ["e2e:int4", "e2e:int4@threads=1"],  # its task was not asked for: the base runs for the pair
    ]
