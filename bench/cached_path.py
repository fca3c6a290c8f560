"""The prefix cache's numeric path against a plain prefill, per weight type: how far logits move.

    python -m bench.cached_path [--quick] --json FILE

For each model and weight type (fused graphs as the shipped CPU profiles build them: fp32;
int8 as ``cpu-x86-int8``; int4 as ``cpu-x86-int4``) and each of ``PROMPTS`` sensor prompts that
share a site's fixed instruction and differ in the reading, the agent's own runtime computes the
next-token logits of the prompt's last position and of 16 teacher-forced tokens after it on
three paths:

    plain    the whole prompt in one prefill (what the export's golden run does)
    cached   the instruction's KV from the prefix cache, the rest prefilled (what serving does)
    split    no cache: the instruction, then the rest, as two prefills (the kernels alone)

in two cases: ``sibling`` (an earlier sensor's prompt with another reading is cached: the
instruction is reused, the reading prefilled) and ``repeat`` (the same prompt was asked before:
all but its last token are reused, and that token runs alone, as in a smoke test after serving
the golden question). It reports, over all positions, of ``cached`` and ``split`` against
``plain``: max |Δlogit|, mean and max KL(plain ‖ other), teacher-forced top-1 agreement; with
the logits' scale (std over the vocabulary) and the smallest top-2 margin on the plain path,
which say how often a difference of that size flips a greedy token. ``cached`` equal to
``split`` means the cache adds nothing of its own: the difference is the kernels' (MatMulNBits
at M = 1 against M = n).

Models: the tiny trained test shapes (``glm-edge``, ``glm4-0414``; peaked logits) and a random-weight
GlmForCausalLM with the GLM-Edge-1.5B shape (``--quick``: ``bench.infer.QUICK``; flat logits).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = 8
FORCED = 16
INSTRUCTION = (
    "You are the maintenance assistant of plant seven. A sensor sends one reading; answer in one "
    "short sentence whether an operator must act, and why. Reading:"
)
CASES = ("sibling", "repeat")
WEIGHTS = {  # weight type -> the shipped profile whose quantization it copies (None: fp32)
    "fp32": None,
    "int8": "cpu-x86-int8",
    "int4": "cpu-x86-int4",
}


def _prompts() -> list[str]:
    rng = np.random.default_rng(5)
    return [
        f"{INSTRUCTION} pressure {rng.uniform(1, 9):.1f} bar on line {int(rng.integers(1, 9))}, "
        f"temperature {rng.uniform(20, 90):.0f} C"
        for _ in range(PROMPTS)
    ]


def _build(ckpt: Path, out: Path, weights: str) -> Path:
    from bench.infer import shipped_layout
    from export.architectures import architecture_for
    from export.checkpoint import Checkpoint
    from export.fused import FusedOptions, build_fused

    name = WEIGHTS[weights]
    opts = FusedOptions(weights="fp32", max_context=1024)
    if name is not None:
        opts = shipped_layout(name, max_context=1024)
    out.mkdir(parents=True)
    c = Checkpoint(ckpt)
    arch = architecture_for(c.config)
    build_fused(c, arch, arch.spec(c.config), opts, out)
    c.close()
    return out / "model.onnx"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _run(
    graph: Any, ids: list[int], forced: list[int], *, cache: bool, split: int = 0
) -> tuple[np.ndarray, int]:
    seq = graph.open()
    try:
        if split:
            graph.prefill(seq, ids[:split], cache=False)
        rows = [graph.prefill(seq, ids[split:], cache=cache)]
        for tok in forced[:-1]:
            rows.append(graph.decode([seq], [tok])[0])
        return np.stack(rows), seq.cached
    finally:
        graph.close(seq)


def _greedy(graph: Any, ids: list[int]) -> list[int]:
    seq = graph.open()
    try:
        out = [int(graph.prefill(seq, ids, cache=False).argmax())]
        while len(out) < FORCED:
            out.append(int(graph.decode([seq], [out[-1]])[0].argmax()))
        return out
    finally:
        graph.close(seq)


def _compare(plain: np.ndarray, other: np.ndarray) -> dict[str, float]:
    lp, lq = _log_softmax(plain), _log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "max_abs_logit_diff": float(np.abs(plain - other).max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((plain.argmax(-1) == other.argmax(-1)).mean()),
    }


def measure(model: Path, tokenizer: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from edge_agent.inference.runtime import open_graph

    tok = Tokenizer.from_file(str(tokenizer))
    graph = open_graph(
        model,
        graph="fused",
        providers=["CPUExecutionProvider"],
        threads=0,
        max_context=1024,
        rows=2,
        prefix_cache_bytes=256 << 20,
    )
    warm = tok.encode(f"{INSTRUCTION} warm-up reading").ids
    paths: dict[str, list[np.ndarray]] = {k: [] for k in ("plain", *CASES, *(f"split-{c}" for c in CASES))}
    margins, scales, hits = [], [], {c: [] for c in CASES}
    for prompt in _prompts():
        ids = tok.encode(prompt).ids
        forced = _greedy(graph, ids)  # the plain path's greedy tokens, fed on every path
        paths["plain"].append(_run(graph, ids, forced, cache=False)[0])
        for case, first in (("sibling", warm), ("repeat", ids)):
            graph.prefix.clear()
            _run(graph, first, forced[:1], cache=True)  # an earlier request leaves its prompt cached
            cached, hit = _run(graph, ids, forced, cache=True)
            paths[case].append(cached)
            paths[f"split-{case}"].append(_run(graph, ids, forced, cache=False, split=hit)[0])
            hits[case].append(hit / len(ids))
        plain = paths["plain"][-1]
        top2 = np.sort(plain, -1)[:, -2:]
        margins.append(float((top2[:, 1] - top2[:, 0]).min()))
        scales.append(float(plain.std(-1).mean()))
    got = {k: np.concatenate(v) for k, v in paths.items()}
    out: dict[str, Any] = {
        "positions": int(got["plain"].shape[0]),
        "logit_std": float(np.mean(scales)),
        "min_top2_margin": float(min(margins)),
    }
    for case in CASES:
        out[case] = {
            "cached_share_of_prompt": round(float(np.mean(hits[case])), 3),
            "cached_vs_plain": _compare(got["plain"], got[case]),
            "split_vs_plain": _compare(got["plain"], got[f"split-{case}"]),
            "cached_vs_split_max_abs_logit_diff": float(np.abs(got[case] - got[f"split-{case}"]).max()),
        }
    return out


def _checkpoints(work: Path, quick: bool) -> list[tuple[str, Path, Path]]:
    from bench.infer import GLM_EDGE_15B, QUICK, write_checkpoint
    from export.tiny_glm import build_checkpoint

    out = []
    for shape in ("glm-edge", "glm4-0414"):
        folder = build_checkpoint(work / shape, shape)
        out.append((f"trained {shape}", folder, folder / "tokenizer.json"))
    dims, name = (QUICK, "random quick") if quick else (GLM_EDGE_15B, "random glm-edge-1.5b")
    folder = write_checkpoint(work / "random", dims)
    out.append((name, folder, folder / "tokenizer.json"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cached_path", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small random model instead of GLM-Edge-1.5B")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--weights", default=",".join(WEIGHTS), help="comma-separated: fp32,int8,int4")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-cached-"))
    try:
        for model, ckpt, tokenizer in _checkpoints(work, args.quick):
            for weights in args.weights.split(","):
                t0 = time.perf_counter()
                onnx = _build(ckpt, work / f"{model.replace(' ', '-')}-{weights}", weights)
                row = {"model": model, "weights": weights, **measure(onnx, tokenizer)}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                shutil.rmtree(onnx.parent)
                rows.append(row)
                for case in CASES:
                    c, k = row[case]["cached_vs_plain"], row[case]["split_vs_plain"]
                    print(
                        f"{model:22} {weights} {case:7}: cached max|Δ| {c['max_abs_logit_diff']:.3g}, "
                        f"KL {c['kl_mean']:.2e}, top-1 {c['top1_agreement']:.3f}; split max|Δ| "
                        f"{k['max_abs_logit_diff']:.3g}; cached-split "
                        f"{row[case]['cached_vs_split_max_abs_logit_diff']:.3g}; logit std "
                        f"{row['logit_std']:.3g}, min top-2 margin {row['min_top2_margin']:.3g}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"bench": "cached_path", "machine": platform.processor() or platform.machine(), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
