"""Inference benchmark: exported graphs against transformers fp32, on GLM-Edge-1.5B dimensions.

    python -m bench.infer [--quick] --json FILE [--variants a,b,...]

A random-weight GlmForCausalLM checkpoint with the real GLM-Edge-1.5B shape (hidden 2048, 28
layers, 16 heads, 4 kv heads, head_dim 128, intermediate 6144, vocab 59264, tied embeddings,
rotary 1.0) is written as bf16 safetensors (``--quick``: a small model). Speed does not depend on
the values. Each variant runs in its own process, so its peak RSS is its own:

    transformers-fp32   AutoModelForCausalLM.generate(), the baseline
    standard-fp32       optimum-onnx graph, plain ONNX ops
    fused-fp32          our fused graph (GroupQueryAttention, SkipSimplifiedLayerNorm)
    fused-int8-b32      + MatMulNBits 8-bit, block 32, accuracy_level 4
    fused-int8-b128     + MatMulNBits 8-bit, block 128 (the shipped cpu-x86-int8 profile)
    fused-int4-b32      + MatMulNBits 4-bit, block 32, accuracy_level 4
    fused-int4-b128     + MatMulNBits 4-bit, block 128, accuracy_level 4

Decode speed: a 32-token prompt then 64 new tokens, greedy, at batch 1 and batch 8, with a
minimal loop on ONNX Runtime (export.ort_runner). Every variant is warmed up first; prefill is the
time to the first new token and ``decode_tok_s`` counts the 63 tokens after it (for transformers
the token arrival times come from a ``generate()`` streamer). Medians over ``--repeats`` runs
(default 3) at batch 1, one fewer at batch 8. Rows:
``{variant, batch, decode_tok_s, prefill_s, repeats, peak_rss_mb, bundle_mb, export_s,
ratio_vs_baseline}``.

A first row ``probe:memory`` records the CPU and how fast an fp32 GEMV streams weights here with
torch (the baseline's BLAS) and with numpy: batch-1 decode is bound by reading the weights, so the
ratios depend on how close the baseline's GEMV gets to this machine's memory bandwidth.

Variant names may end in ``-sym``: symmetric quantization, no zero points (export/quant.py).

Then the whole ``edgectl export`` pipeline (graph, quantization, quality gate with the fp32
transformers reference, smoke test, signing) per route, in its own process, with ``--force``
(random weights cannot pass a gate meant for trained models; the work is the same):

    export:cpu-x86-int4     fused route, int4
    export:orin-nano-int4   standard route, int4 QDQ with fp16 activations (--no-engine: no GPU)

Those rows have ``batch: null`` and ``export_s``, ``peak_rss_mb``, ``fp32_model_mb`` and
``rss_vs_fp32`` (the issue's bound: peak RSS under ~3x the fp32 model).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT, NEW = 32, 64
BATCHES = (1, 8)
PIPELINES = ("export:cpu-x86-int4", "export:orin-nano-int4")
VARIANTS = (
    "transformers-fp32",
    "standard-fp32",
    "fused-fp32",
    "fused-int8-b32",
    "fused-int8-b128",
    "fused-int4-b32",
    "fused-int4-b128",
)

GLM_EDGE_15B = dict(
    hidden_size=2048,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=6144,
    vocab_size=59264,
)
QUICK = dict(
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=8192,
)


def shipped_layout(profile_name: str, **changes: Any) -> Any:
    """The ``FusedOptions`` the shipped profile ``profile_name`` exports with (``changes`` on top),
    rounded by the scale search instead of GPTQ: GPTQ changes which codes are stored, not their
    layout, bytes or kernel, and the benches' random weights would cost minutes of calibrating a
    1.5B reference for nothing."""
    import dataclasses

    from edgeglm.profiles import load_profile
    from export.fused import FusedOptions

    return dataclasses.replace(FusedOptions.for_profile(load_profile(profile_name)), gptq=False, **changes)


def write_checkpoint(folder: Path, dims: dict[str, int], seed: int = 0) -> Path:
    """A GlmForCausalLM folder with random bf16 weights, written one tensor at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    q, kv = dims["num_attention_heads"] * dims["head_dim"], dims["num_key_value_heads"] * dims["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(dims["num_hidden_layers"]):
        p = f"model.layers.{n}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_up_proj.weight": (2 * i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        }
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    rng = np.random.default_rng(seed)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            w = (
                np.ones(shape, np.float32)
                if name.endswith("norm.weight")
                else rng.normal(0, 0.02, shape).astype(np.float32)
            )
            fh.write((w.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    config = {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "partial_rotary_factor": 1.0,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "pad_token_id": 0,
        "eos_token_id": 1,
        **dims,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    _write_tokenizer(folder)
    return folder


def _write_tokenizer(folder: Path) -> None:
    """A BPE tokenizer trained on the shipped corpus: ``edgectl export`` needs one to gate."""
    from export.tiny_glm import read_corpus, train_tokenizer

    train_tokenizer(read_corpus(), 4096).save(str(folder / "tokenizer.json"))


def worker_pipeline(profile_name: str, ckpt: Path, work: Path) -> dict[str, Any]:
    """One full ``edgectl export`` run; its seconds and this process's peak RSS."""
    from edgeglm.keys import create_keypair
    from edgeglm.profiles import load_profile
    from export.checkpoint import Checkpoint
    from export.pipeline import run_export
    from export.spec import ExportSpec

    private, _, _ = create_keypair(work / f"keys-{profile_name}", "bench")
    out = work / f"bundle-{profile_name}"
    spec = ExportSpec(
        checkpoint=ckpt,
        profile=load_profile(profile_name),
        version="1.0.0",
        model_name="glm-edge-1.5b-random",
        out_dir=out,
        key_path=private,
        force=True,
        build_engine=False,
    )
    result = run_export(spec, say=lambda line: print(line, file=sys.stderr, flush=True))
    fp32_mb = Checkpoint(ckpt).fp32_bytes() / 1e6
    row = {
        "export_s": result.seconds,
        "peak_rss_mb": _peak_mb(),
        "fp32_model_mb": fp32_mb,
        "rss_vs_fp32": _peak_mb() / fp32_mb,
        "bundle_mb": result.manifest.total_bytes() / 1e6,
        "gate_passed": result.quality.passed,
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt(batch: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(2, vocab, (batch, PROMPT), dtype=np.int64)


class _Stamps:
    """A generate() streamer that only notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _decode_row(batch: int, prefills: list[float], decodes: list[float]) -> dict[str, Any]:
    """Medians over repeats; decode_tok_s counts the NEW - 1 tokens after the first one."""
    return {
        "batch": batch,
        "prefill_s": statistics.median(prefills),
        "decode_tok_s": batch * (NEW - 1) / statistics.median(decodes),
        "repeats": len(decodes),
    }


def timed_generate(model: Any, ids: Any) -> tuple[float, float]:
    """One greedy ``generate()`` of NEW tokens: (seconds to the first new token, seconds for the rest)."""
    import torch

    stamps = _Stamps()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            streamer=stamps,
        )
    # times[0]: the prompt is handed over; times[1]: first new token (prefill done)
    return stamps.times[1] - t, stamps.times[-1] - stamps.times[1]


def warm_up(model: Any, ids: Any) -> None:
    import torch

    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)


def worker_transformers(ckpt: Path, vocab: int, repeats: int) -> list[dict[str, Any]]:
    """generate() fp32, warmed up; token arrival times from a streamer split prefill from decode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    rows = []
    for batch in BATCHES:
        ids = torch.from_numpy(_prompt(batch, vocab))
        warm_up(model, ids)
        runs = [timed_generate(model, ids) for _ in range(_repeats(batch, repeats))]
        rows.append(_decode_row(batch, [r[0] for r in runs], [r[1] for r in runs]))
    return rows


def worker_onnx(model: Path, vocab: int, repeats: int) -> list[dict[str, Any]]:
    from export.ort_runner import OrtDecoder

    dec = OrtDecoder(model)
    rows = []
    for batch in BATCHES:
        ids = _prompt(batch, vocab)
        dec.greedy(ids[:, :4], 2)  # warm up
        prefills, decodes = [], []
        for _ in range(_repeats(batch, repeats)):
            t = time.perf_counter()
            logits, past = dec.step(ids, dec.empty_past(batch), PROMPT)
            nxt = logits[:, -1].argmax(-1)  # the first new token
            t1 = time.perf_counter()
            total = PROMPT
            for _ in range(NEW - 1):
                total += 1
                logits, past = dec.step(nxt[:, None], past, total)
                nxt = logits[:, -1].argmax(-1)
            prefills.append(t1 - t)
            decodes.append(time.perf_counter() - t1)
        rows.append(_decode_row(batch, prefills, decodes))
    return rows


def _repeats(batch: int, repeats: int) -> int:
    """Batch 1 (the targets) gets every repeat; batch 8 one fewer, at least one."""
    return repeats if batch == 1 else max(1, repeats - 1)


def probe_memory() -> dict[str, Any]:
    """How fast this machine streams fp32 weights through a GEMV: torch (the baseline's) and numpy.

    Decode at batch 1 is bound by reading the weights, so ratios against transformers depend on how
    close torch's GEMV gets to the memory bandwidth here; the row makes runs on different machines
    comparable.
    """
    import os
    import platform

    import torch

    w = np.random.default_rng(0).standard_normal((24576, 2048), dtype=np.float32)  # 201 MB
    x = np.ones((1, 2048), np.float32)
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)

    def rate(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(15):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return w.nbytes / statistics.median(times) / 1e9

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    with torch.no_grad():
        torch_gbs = rate(lambda: xt @ wt.T)
    return {
        "variant": "probe:memory",
        "batch": None,
        "cpu": model,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_gemv_gb_s": round(torch_gbs, 2),
        "numpy_gemv_gb_s": round(rate(lambda: x @ w.T), 2),
    }


def worker_export(variant: str, ckpt: Path, out: Path) -> float:
    """Build ``variant``'s graph into ``out``; returns seconds."""
    from export.architectures import architecture_for
    from export.checkpoint import Checkpoint

    t = time.perf_counter()
    if variant == "standard-fp32":
        from export.standard import export_standard

        export_standard(ckpt, out, model_type="glm")
    else:
        from export.fused import FusedOptions, build_fused

        _, weights, *rest = variant.split("-")
        block = [int(r[1:]) for r in rest if r.startswith("b")]
        opts = FusedOptions(
            weights=weights,
            block_size=block[0] if block else 32,
            accuracy_level=4,
            symmetric="sym" in rest,
            max_context=PROMPT + NEW + 16,
        )
        c = Checkpoint(ckpt)
        arch = architecture_for(c.config)
        build_fused(c, arch, arch.spec(c.config), opts, out)
    return time.perf_counter() - t


def run_worker(args: argparse.Namespace) -> None:
    vocab = json.loads((args.ckpt / "config.json").read_text())["vocab_size"]
    result: dict[str, Any] = {"variant": args.worker}
    if args.worker.startswith("export:"):
        print(json.dumps({**result, **worker_pipeline(args.worker.split(":", 1)[1], args.ckpt, args.work)}))
        return
    if args.worker == "probe:memory":
        print(json.dumps(probe_memory()))
        return
    if args.worker == "transformers-fp32":
        result["rows"] = worker_transformers(args.ckpt, vocab, args.repeats)
        result["export_s"], result["bundle_mb"] = None, None
    else:
        out = args.work / args.worker
        result["export_s"] = worker_export(args.worker, args.ckpt, out)
        result["export_peak_rss_mb"] = _peak_mb()
        result["bundle_mb"] = sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6
        result["rows"] = worker_onnx(out / "model.onnx", vocab, args.repeats)
    result["peak_rss_mb"] = _peak_mb()
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.infer", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model instead of GLM-Edge-1.5B dimensions")
    ap.add_argument("--json", type=Path, required=False)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help="'' to skip the edgectl export runs")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant at batch 1 (median)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.json is None:
        ap.error("--json is required")
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        ckpt = write_checkpoint(work / "ckpt", QUICK if args.quick else GLM_EDGE_15B)
        print(f"checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
        rows: list[dict[str, Any]] = []
        probe = _in_worker("probe:memory", ckpt, work)
        if probe:
            rows.append(probe)
            print(
                f"memory probe: fp32 GEMV torch {probe['torch_gemv_gb_s']} GB/s, "
                f"numpy {probe['numpy_gemv_gb_s']} GB/s ({probe['cpu']}, {probe['cpus']} CPUs)",
                flush=True,
            )
        for variant in [v for v in args.variants.split(",") if v]:
            res = _in_worker(variant, ckpt, work, args.repeats)
            for r in res["rows"] if res else []:
                rows.append(
                    {
                        "variant": variant,
                        "batch": r["batch"],
                        "decode_tok_s": round(r["decode_tok_s"], 3),
                        "prefill_s": round(r["prefill_s"], 4),
                        "repeats": r["repeats"],
                        "peak_rss_mb": round(res["peak_rss_mb"], 1),
                        "bundle_mb": res["bundle_mb"] and round(res["bundle_mb"], 1),
                        "export_s": res["export_s"] and round(res["export_s"], 2),
                        "export_peak_rss_mb": res.get("export_peak_rss_mb")
                        and round(res["export_peak_rss_mb"], 1),
                    }
                )
                print(
                    f"{variant:18} batch {r['batch']}: {r['decode_tok_s']:8.2f} tok/s  "
                    f"prefill {r['prefill_s']:.3f} s  rss {res['peak_rss_mb']:,.0f} MB  "
                    f"bundle {res['bundle_mb'] or 0:,.0f} MB",
                    flush=True,
                )
            shutil.rmtree(work / variant, ignore_errors=True)
        for pipeline in [p for p in args.pipelines.split(",") if p]:
            res = _in_worker(pipeline, ckpt, work)
            if res:
                rows.append(
                    {"batch": None, "decode_tok_s": None, "prefill_s": None}
                    | {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}
                )
                print(
                    f"{pipeline:24} {res['export_s']:7.1f} s  peak rss {res['peak_rss_mb']:,.0f} MB "
                    f"= {res['rss_vs_fp32']:.2f}x the fp32 model  bundle {res['bundle_mb']:,.0f} MB",
                    flush=True,
                )
    base = {r["batch"]: r["decode_tok_s"] for r in rows if r["variant"] == "transformers-fp32"}
    for r in rows:
        if r["variant"] == "probe:memory":
            continue
        r["ratio_vs_baseline"] = (
            round(r["decode_tok_s"] / base[r["batch"]], 2)
            if r["batch"] in base and r["decode_tok_s"]
            else None
        )
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print("\nratios vs transformers fp32 (same run):")
    for r in rows:
        if r.get("ratio_vs_baseline") is not None:
            print(f"  {r['variant']:18} batch {r['batch']}: {r['ratio_vs_baseline']}x")
    return 0


def _in_worker(variant: str, ckpt: Path, work: Path, repeats: int = 1) -> dict[str, Any] | None:
    """Run one variant in a fresh process (its peak RSS is its own); None if it failed."""
    cmd = [sys.executable, "-m", "bench.infer", "--worker", variant, "--ckpt", str(ckpt), "--work", str(work)]
    cmd += ["--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"{variant}: FAILED\n{proc.stderr[-2000:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    raise SystemExit(main())
