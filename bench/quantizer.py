"""Quantizer levers at GLM-Edge-1.5B dimensions: export time, bundle size, batch-1 decode speed.

    python -m bench.quantizer --json FILE [--quick] [--variants a,b,...] [--rounds N]

The random-weight checkpoint of ``bench.infer`` (GLM-Edge-1.5B shape, bf16) is exported once per
variant with the fused route (MatMulNBits, accuracy_level 4, symmetric); a variant name is
``b<block>[-rtn][-head8][-l<N>][-int8]``::

    b32-rtn       block 32, round-to-nearest scales: the baseline (cpu-x86-int4 before the search)
    b128          block 128, least-squares scale search (export/quant.py search_scales)
    b128-head8    the same, embedding table + lm_head at 8 bits (block 128)
    b256-head8-l1 block 256, 8-bit head, the first decoder layer at 8 bits (cpu-x86-int4's layout;
                  it also rounds by GPTQ, which changes the codes, not the bytes or the kernel)
    b128-int8     8-bit weights at block 128 (cpu-x86-int8's layout); b256-int8 the larger block

Speed does not depend on the weights' values, so random weights measure it; quality is measured on
the trained tiny shapes by the export tests and the gate. Every bundle's session is loaded in this
one process, then ``--rounds`` rounds decode a 32-token prompt + 64 new tokens at batch 1 on each
variant in turn (A B A B ...); ``decode_tok_s`` counts the 63 tokens after the first.
``ratio_vs_baseline`` is the median over rounds of variant / baseline in the same round. Rows:
``{variant, block_size, scale_search, weights, head_bits, int8_layers, export_s, bundle_mb,
decode_tok_s (median), decode_tok_s_rounds, ratio_vs_baseline, ratio_rounds}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.infer import GLM_EDGE_15B, QUICK, write_checkpoint

PROMPT, NEW = 32, 64
BASELINE = "b32-rtn"
VARIANTS = (BASELINE, "b32", "b64", "b128", "b64-head8", "b128-head8", "b256-head8-l1")


def options(variant: str) -> Any:
    """``b<block>[-rtn][-head8][-l<N>][-int8]`` -> FusedOptions (symmetric, accuracy_level 4; int4
    unless ``-int8``)."""
    from export.fused import FusedOptions

    block, *flags = variant.split("-")
    layers = [f for f in flags if f[:1] == "l" and f[1:].isdigit()]
    if not block.startswith("b") or not block[1:].isdigit() or set(flags) - {"rtn", "head8", "int8", *layers}:
        raise SystemExit(f"bad variant {variant!r}: b<block>[-rtn][-head8][-l<N>][-int8]")
    return FusedOptions(
        weights="int8" if "int8" in flags else "int4",
        block_size=int(block[1:]),
        accuracy_level=4,
        symmetric=True,
        scale_search="rtn" not in flags,
        head_int8="head8" in flags,
        int8_layers=int(layers[0][1:]) if layers else 0,
        max_context=PROMPT + NEW + 16,
    )


def export(variant: str, ckpt: Path, out: Path) -> float:
    from export.architectures import architecture_for
    from export.checkpoint import Checkpoint
    from export.fused import build_fused

    c = Checkpoint(ckpt)
    arch = architecture_for(c.config)
    t = time.perf_counter()
    build_fused(c, arch, arch.spec(c.config), options(variant), out)
    return time.perf_counter() - t


def decode_tok_s(decoder: Any, ids: np.ndarray) -> float:
    logits, past = decoder.step(ids, decoder.empty_past(1), PROMPT)
    nxt = logits[:, -1].argmax(-1)
    t = time.perf_counter()
    total = PROMPT
    for _ in range(NEW - 1):
        total += 1
        logits, past = decoder.step(nxt[:, None], past, total)
        nxt = logits[:, -1].argmax(-1)
    return (NEW - 1) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quantizer", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="a small model instead of GLM-Edge-1.5B dimensions")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"the first is the baseline ({BASELINE})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, help="keep checkpoint and bundles here (reused when present)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        options(v)
    from export.ort_runner import OrtDecoder

    with tempfile.TemporaryDirectory(prefix="bench-quantizer-") as tmp:
        work = args.work or Path(tmp)
        ckpt = work / ("ckpt-quick" if args.quick else "ckpt")
        if not (ckpt / "config.json").is_file():
            write_checkpoint(ckpt, QUICK if args.quick else GLM_EDGE_15B)
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        ids = np.random.default_rng(1).integers(2, vocab, (1, PROMPT), dtype=np.int64)
        rows: dict[str, dict[str, Any]] = {}
        decoders = {}
        for v in variants:
            out = work / f"{ckpt.name}-{v}"
            export_s = None if (out / "model.onnx").is_file() else export(v, ckpt, out)
            opts = options(v)
            rows[v] = {
                "variant": v,
                "block_size": opts.block_size,
                "scale_search": opts.scale_search,
                "weights": opts.weights,
                "head_bits": 8 if opts.head_int8 or opts.weights == "int8" else 4,
                "int8_layers": opts.int8_layers,
                "export_s": export_s and round(export_s, 1),
                "bundle_mb": round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6, 1),
                "decode_tok_s_rounds": [],
            }
            decoders[v] = OrtDecoder(out / "model.onnx")
            decoders[v].greedy(ids[:, :4], 2)  # warm up
            print(f"{v:12} export {export_s or 0:6.1f} s  bundle {rows[v]['bundle_mb']:,.0f} MB", flush=True)
        for r in range(args.rounds):
            for v in variants:
                rows[v]["decode_tok_s_rounds"].append(round(decode_tok_s(decoders[v], ids), 3))
            print(
                f"round {r + 1}: "
                + "  ".join(f"{v} {rows[v]['decode_tok_s_rounds'][-1]:.2f}" for v in variants)
            )
    base = rows[variants[0]]["decode_tok_s_rounds"]
    for row in rows.values():
        tok = row["decode_tok_s_rounds"]
        row["decode_tok_s"] = round(statistics.median(tok), 3)
        row["ratio_rounds"] = [round(a / b, 3) for a, b in zip(tok, base, strict=True)]
        row["ratio_vs_baseline"] = round(statistics.median(row["ratio_rounds"]), 3)
        print(
            f"{row['variant']:12} {row['decode_tok_s']:7.2f} tok/s  "
            f"{row['ratio_vs_baseline']:.3f}x {variants[0]}"
        )
    args.json.write_text(json.dumps(list(rows.values()), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
