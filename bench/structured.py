"""Constrained decoding's price: per-token cost of JSON-schema answers against free ones, same run.

    python -m bench.structured [--quick] --json FILE

A random-weight GlmForCausalLM with the GLM-Edge-1.5B shape (``--quick``: ``bench.infer.QUICK``)
is exported with the fused int4 route as ``bench.serve`` builds it, with a byte-level BPE
tokenizer of the model's full vocabulary (59,264 tokens, trained on the shipped corpus plus
synthetic words: the mask's cost grows with the vocabulary, so a small tokenizer would flatter
it). The agent's own engine and scheduler run in this process; no MQTT, no HTTP.

Each measurement is a pair run back to back, in alternating order, and the pair's ratio is kept;
the reported ratio is the median of the pairs' ratios (the machine's drift cancels within a pair):

    constrained_vs_free_b1      per-token decode cost of one constrained request alone over one
                                free request alone (target <= 1.10)
    constrained_vs_free_b8      the same with eight requests decoding together, all constrained
                                against all free
    neighbour_free_tok_s_ratio  decode tokens/s of the seven free requests of a batch of eight
                                that holds one constrained request, over that of seven free
                                requests batched with an eighth free one

and the medians behind them (``*_ms_per_token``, ``*_tok_s``), the cost of one mask computed
alone (``mask_us``: llguidance, the schema below, the vocabulary above), the machine's load
average at the start and the end, and the sizes. Per-token cost is a request's decode time over
its decoded tokens (the engine's own timings): a constrained answer may end before ``NEW`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.infer import GLM_EDGE_15B, QUICK, write_checkpoint
from bench.serve import build_bundle, sensor_prompt, write_profile

NEW = 48
# What a controller parses: free text, an enum, numbers, a list. At least 40 readings: no answer
# can be complete within NEW tokens, so a constrained request decodes exactly as many tokens as a
# free one and the batches keep their size to the end (a row that ended early would shrink them).
SCHEMA = {
    "type": "object",
    "properties": {
        "fault": {"type": "boolean"},
        "severity": {"enum": ["low", "medium", "high"]},
        "check_first": {"type": "string", "maxLength": 24},
        "readings": {"type": "array", "items": {"type": "number"}, "minItems": 40},
    },
    "required": ["fault", "severity", "check_first", "readings"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}


def _tokenizer(folder: Path, vocab: int) -> None:
    """Replace the checkpoint's 4,096-token tokenizer with one of the model's whole vocabulary."""
    from export.tiny_glm import read_corpus, train_tokenizer

    rng = np.random.default_rng(0)
    syllables = ["ka", "to", "ri", "mo", "sen", "val", "ve", "pre", "ssu", "re", "bar", "li", "pu"]
    syllables += ["fil", "ter", "ox", "qua", "zi", "ne", "lo", "mi", "da", "chi", "bo", "il", "er"]
    words = ["".join(rng.choice(syllables, int(rng.integers(1, 5)))) for _ in range(400_000)]
    tok = train_tokenizer(read_corpus() + "\n" + " ".join(words), vocab)
    tok.save(str(folder / "tokenizer.json"))


def _build(work: Path, quick: bool) -> tuple[Any, Any]:
    from edge_agent.inference.engine import Engine
    from edgeglm.profiles import load_profile

    dims = QUICK if quick else GLM_EDGE_15B
    ckpt = write_checkpoint(work / "ckpt", dims)
    _tokenizer(ckpt, dims["vocab_size"])
    bundle = build_bundle(ckpt, work / "bundle", max_context=512)
    profile = load_profile(write_profile(work / "bench-cpu-x86-int4.toml", 512, prefix_cache_mb=0))
    engine = Engine.load(bundle, profile=profile)
    return engine, profile


def _batch(scheduler: Any, engine: Any, constrained: list[bool]) -> list[Any]:
    """Run one batch (one request per flag) to the end; the results, in order."""
    from edgeglm.protocol import InferRequest

    done = threading.Event()
    results: dict[int, Any] = {}
    lock = threading.Lock()

    def finished(i: int) -> Any:
        def on_done(result: Any) -> None:
            with lock:
                results[i] = result
                if len(results) == len(constrained):
                    done.set()

        return on_done

    prompts = []
    for flag in constrained:
        request = InferRequest(
            prompt=sensor_prompt(), max_tokens=NEW, response_format=FORMAT if flag else None
        )
        prompts.append(engine.prepare(request))  # compiling the schema is not decoding: done first
    for i, prompt in enumerate(prompts):
        scheduler.submit(prompt, on_done=finished(i))
    if not done.wait(1800):
        raise RuntimeError("a benchmark batch did not finish")
    out = [results[i] for i in range(len(constrained))]
    for r in out:
        if r.error_code is not None:
            raise RuntimeError(f"a benchmark request failed: {r.error_code}: {r.error_message}")
    return out


def _ms_per_token(results: list[Any]) -> float:
    assert all(r.completion_tokens == NEW for r in results), "a request ended before NEW tokens"
    return statistics.mean(r.decode_ms / max(1, r.completion_tokens - 1) for r in results)


def _tok_s(results: list[Any]) -> float:
    return statistics.mean((r.completion_tokens - 1) / (r.decode_ms / 1000) for r in results if r.decode_ms)


def _pairs(run_a: Any, run_b: Any, repeats: int) -> tuple[list[float], list[Any], list[Any]]:
    """``repeats`` pairs (a, b) in alternating order; each pair's b/a ratio of the measure."""
    ratios, a_all, b_all = [], [], []
    for i in range(repeats):
        if i % 2:
            b, a = run_b(), run_a()
        else:
            a, b = run_a(), run_b()
        a_all.append(a)
        b_all.append(b)
        ratios.append(b / a)
    return ratios, a_all, b_all


def _mask_us(engine: Any) -> float:
    from edgeglm.protocol import InferRequest

    prompt = engine.prepare(InferRequest(prompt="x", max_tokens=8, response_format=FORMAT))
    assert prompt.grammar is not None
    times = []
    for _ in range(50):
        constraint = prompt.grammar.matcher()
        head = '{"fault":true,"severity":"low","check_first":"the '  # inside a free string
        text_tokens = engine.codec.tokenizer.encode(head, add_special_tokens=False).ids
        for token in text_tokens:
            constraint.allowed()
            constraint.advance(token)
        t0 = time.perf_counter()
        constraint.allowed()  # inside a free string: the widest mask
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def run(quick: bool) -> dict[str, Any]:
    from edge_agent.inference.scheduler import Scheduler

    repeats = 5 if quick else 7
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        t0 = time.perf_counter()
        engine, profile = _build(Path(tmp), quick)
        build_s = time.perf_counter() - t0
        with Scheduler(engine, max_batch_size=8, batch_wait_ms=200) as scheduler:
            _batch(scheduler, engine, [True, False])  # warm both paths

            def per_token(flags: list[bool]) -> Any:
                return lambda: _ms_per_token(_batch(scheduler, engine, flags))

            b1, free1, bound1 = _pairs(per_token([False]), per_token([True]), repeats)
            b8, free8, bound8 = _pairs(per_token([False] * 8), per_token([True] * 8), repeats)

            def free_rows(flags: list[bool]) -> Any:
                return lambda: _tok_s(_batch(scheduler, engine, flags)[1:])  # rows 1..7: free ones

            neighbour, alone, beside = _pairs(
                free_rows([False] * 8), free_rows([True] + [False] * 7), repeats
            )
        mask_us = _mask_us(engine)
    return {
        "model": "GLM-Edge-1.5B shape, random weights, fused int4"
        if not quick
        else "quick shape, fused int4",
        "vocab": engine.graph.vocab,
        "tokenizer_vocab": engine.codec.tokenizer.get_vocab_size(),
        "new_tokens": NEW,
        "repeats": repeats,
        "constrained_vs_free_b1": statistics.median(b1),
        "constrained_vs_free_b8": statistics.median(b8),
        "neighbour_free_tok_s_ratio": statistics.median(neighbour),
        "pairs_b1": b1,
        "pairs_b8": b8,
        "pairs_neighbour": neighbour,
        "free_b1_ms_per_token": statistics.median(free1),
        "constrained_b1_ms_per_token": statistics.median(bound1),
        "free_b8_ms_per_token": statistics.median(free8),
        "constrained_b8_ms_per_token": statistics.median(bound8),
        "free_rows_tok_s_all_free": statistics.median(alone),
        "free_rows_tok_s_beside_constrained": statistics.median(beside),
        "mask_us": mask_us,
        "target_b1": 1.10,
        "build_s": build_s,
        "intra_op_threads": profile.intra_op_threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, fewer pairs")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    result = run(args.quick)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
