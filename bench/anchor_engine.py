"""Our side of the llama.cpp anchor: the agent's own engine on the bench checkpoint, one task a process.

Bundles: the fused graph quantized as a shipped profile says (``cpu-x86-int4``, ``cpu-x86-int8``:
block size, accuracy level, symmetric), sealed for that profile. The engine is the agent's
(:class:`edge_agent.inference.engine.Engine`, what ``edgectl agent infer`` and ``serve`` run),
loaded with the shipped profile but ``max_batch_size = 8``. Like ``llama-bench``, a run ignores the
stop token: it always decodes the tokens asked for (random weights may pick it).

Tasks (``python -m bench.anchor_engine TASK --bundle DIR --profile NAME``, one JSON line out):

    decode    batch 1: a 4-token prompt, then 64 decode steps; tokens/s of those steps, and the
              time per step spent inside ``session.run`` and outside it (Python, sampling, copies)
    prefill   a 256-token prompt prefilled whole (no prefix cache): prompt tokens/s
    e2e       8 requests at once through the scheduler (70-token prompts, 64 new tokens each):
              generated tokens/s from the first submit to the last answer, prefix cache off and on
              (the prompts share a 59-token head, as a site's sensors do), and one request alone

``--variant k=v,...`` runs the engine with a runtime lever changed (see :func:`apply_variant`);
the anchor pairs it with the unchanged engine in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

DECODE_STEPS, PREFILL_TOKENS = 64, 256
E2E_PROMPT, E2E_NEW, E2E_CLIENTS, E2E_SHARED_HEAD = 70, 64, 8, 59
PROFILES = ("cpu-x86-int4", "cpu-x86-int8")


def build_bundle(ckpt: Path, out: Path, profile_name: str) -> Path:
    """The fused graph quantized as ``profile_name`` says, with tokenizer files, sealed and signed."""
    from bench.infer import shipped_layout
    from edgeglm.bundle_files import seal_folder
    from edgeglm.keys import create_keypair, load_private_key
    from edgeglm.profiles import load_profile
    from export.architectures import architecture_for
    from export.checkpoint import Checkpoint
    from export.fused import build_fused

    shipped = load_profile(profile_name)
    assert shipped.block_size is not None and shipped.weights in ("int4", "int8")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    c = Checkpoint(ckpt)
    arch = architecture_for(c.config)
    spec = arch.spec(c.config)
    build_fused(c, arch, spec, shipped_layout(profile_name), tmp)
    for path in [ckpt / "config.json", *c.tokenizer_files()]:
        shutil.copy2(path, tmp / path.name)
    keys = out.with_name(out.name + ".keys")
    shutil.rmtree(keys, ignore_errors=True)
    private, _, _ = create_keypair(keys, "bench")
    kv = {"layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim, "dtype": "fp32"}
    seal_folder(
        tmp,
        load_private_key(private),
        model="glm-edge-1.5b-random",
        version="1.0.0",
        profile=profile_name,
        runtime={"graph": "fused", "kv_cache": kv},
    )
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------- variants
VARIANT_KEYS = {
    "threads": "intra_op threads (0: ORT's default, one per physical core)",
    "spin": "session.intra_op.allow_spinning (1 on, ORT's default; 0 off)",
    "dyn_block": "session.dynamic_block_base (0 off; N > 0: dynamic work split in N-sized blocks)",
    "opt": "graph optimization level: basic, extended, all (the engine's)",
    "acc": "MatMulNBits accuracy_level rewritten in the graph (4: int8 compute; 0/1: fp32)",
    "ctx": "max_context of the profile (the KV arena's length)",
    "engine": "a folder holding another edge_agent package (the unchanged engine, for a code change)",
}


def parse_variant(text: str) -> dict[str, str]:
    """``"spin=0,dyn_block=4"`` -> ``{"spin": "0", "dyn_block": "4"}``; unknown keys are refused."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ValueError(f"variant entry {part!r} is not key=value")
        if key not in VARIANT_KEYS:
            raise ValueError(f"unknown variant key {key!r}; known: {', '.join(sorted(VARIANT_KEYS))}")
        out[key] = value
    return out


def _variant_bundle(bundle: Path, accuracy_level: int, work: Path) -> Path:
    """A view of ``bundle`` whose graph runs MatMulNBits at ``accuracy_level`` (weights linked)."""
    import onnx

    view = work / f"{bundle.name}-acc{accuracy_level}"
    if not view.exists():
        view.mkdir(parents=True)
        for f in bundle.iterdir():
            if f.name != "model.onnx":
                (view / f.name).symlink_to(f.resolve())
        proto = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = accuracy_level
        onnx.save_model(proto, str(view / "model.onnx"))
    return view


@contextmanager
def apply_variant(variant: dict[str, str]) -> Iterator[None]:
    """Load the engine's sessions with the variant's session options (the engine's own otherwise)."""
    import onnxruntime as ort

    from edge_agent.inference import runtime

    entries = {}
    if "spin" in variant:
        entries["session.intra_op.allow_spinning"] = variant["spin"]
    if "dyn_block" in variant:
        entries["session.dynamic_block_base"] = variant["dyn_block"]
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if not entries and "opt" not in variant:
        yield
        return
    original = runtime._session

    def session(model: Path, providers: Any, threads: int) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[variant.get("opt", "all")]
        if threads:
            opts.intra_op_num_threads = threads
        for key, value in entries.items():
            opts.add_session_config_entry(key, value)
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])

    runtime._session = session  # type: ignore[assignment]
    try:
        yield
    finally:
        runtime._session = original


# ------------------------------------------------------------------------------------ engine
def load_engine(bundle: Path, profile_name: str, variant: dict[str, str], *, batch: int = 8) -> Any:
    from edge_agent.inference.engine import Engine
    from edgeglm.profiles import load_profile

    if "acc" in variant:
        bundle = _variant_bundle(bundle, int(variant["acc"]), bundle.parent)
    update: dict[str, Any] = {"max_batch_size": batch}
    if "ctx" in variant:
        update["max_context"] = int(variant["ctx"])
    profile = load_profile(profile_name).model_copy(update=update)
    threads = int(variant["threads"]) if "threads" in variant else None
    with apply_variant(variant):
        engine = Engine.load(bundle, profile=profile, threads=threads)
    engine.stop_tokens = frozenset()  # like llama-bench: always the tokens asked for
    return engine


def _ids(rng: np.random.Generator, n: int, vocab: int) -> tuple[int, ...]:
    return tuple(int(x) for x in rng.integers(2, vocab, n))


def _timed_runs(engine: Any) -> tuple[list[float], Callable[[], None]]:
    """Wrap the session's run: the list collects each run's seconds; call the second to unwrap."""
    session = engine.graph.session
    run = session.run_with_iobinding
    spent: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t)

    session.run_with_iobinding = timed
    return spent, lambda: setattr(session, "run_with_iobinding", run)


def task_decode(engine: Any, repeats: int) -> dict[str, Any]:
    from edge_agent.inference.generation import Prompt

    rng = np.random.default_rng(1)
    vocab = engine.graph.vocab
    engine.generate(Prompt(ids=_ids(rng, 4, vocab), max_tokens=8))  # warm up
    speeds, inside, outside = [], [], []
    for _ in range(repeats):
        spent, unwrap = _timed_runs(engine)
        r = engine.generate(Prompt(ids=_ids(rng, 4, vocab), max_tokens=DECODE_STEPS + 1))
        unwrap()
        steps = r.completion_tokens - 1
        assert steps == DECODE_STEPS, r.finish_reason
        decode_s = r.decode_ms / 1000
        run_s = sum(spent[1:])  # spent[0] is the prefill
        speeds.append(steps / decode_s)
        inside.append(run_s / steps * 1000)
        outside.append((decode_s - run_s) / steps * 1000)
    return {
        "tok_s": statistics.median(speeds),
        "tok_s_runs": speeds,
        "run_ms_per_token": statistics.median(inside),
        "outside_run_ms_per_token": statistics.median(outside),
    }


def task_prefill(engine: Any, repeats: int) -> dict[str, Any]:
    from edge_agent.inference.generation import Prompt

    rng = np.random.default_rng(2)
    vocab = engine.graph.vocab
    engine.generate(Prompt(ids=_ids(rng, PREFILL_TOKENS, vocab), max_tokens=2, prefix_cache=False))
    speeds = []
    for _ in range(repeats):
        r = engine.generate(Prompt(ids=_ids(rng, PREFILL_TOKENS, vocab), max_tokens=2, prefix_cache=False))
        speeds.append(PREFILL_TOKENS / (r.prefill_ms / 1000))
    return {"tok_s": statistics.median(speeds), "tok_s_runs": speeds}


def _e2e_once(engine: Any, prompts: list[tuple[int, ...]], cache: bool) -> tuple[float, list[Any]]:
    """All ``prompts`` submitted at once; (seconds to the last answer, results)."""
    from edge_agent.inference.generation import Prompt
    from edge_agent.inference.scheduler import Scheduler

    done = threading.Event()
    results: list[Any] = []
    lock = threading.Lock()

    def on_done(result: Any) -> None:
        with lock:
            results.append(result)
            if len(results) == len(prompts):
                done.set()

    with Scheduler(engine, max_batch_size=len(prompts)) as scheduler:
        t = time.perf_counter()
        for ids in prompts:
            scheduler.submit(Prompt(ids=ids, max_tokens=E2E_NEW, prefix_cache=cache), on_done=on_done)
        if not done.wait(1800):
            raise RuntimeError("an e2e batch did not finish")
        wall = time.perf_counter() - t
    for r in results:
        if r.error_code is not None or r.completion_tokens != E2E_NEW:
            raise RuntimeError(f"an e2e request failed: {r.error_code} {r.error_message}")
    return wall, results


def task_e2e(engine: Any, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    vocab = engine.graph.vocab
    head = _ids(rng, E2E_SHARED_HEAD, vocab)

    def prompts(n: int) -> list[tuple[int, ...]]:
        return [head + _ids(rng, E2E_PROMPT - E2E_SHARED_HEAD, vocab) for _ in range(n)]

    _e2e_once(engine, prompts(2), cache=True)  # warm up; stores the head in the prefix cache
    out: dict[str, list[float]] = {"off_8": [], "on_8": [], "off_1": []}
    cached = []
    for i in range(repeats):
        order = ("off_8", "on_8", "off_1") if i % 2 == 0 else ("off_1", "on_8", "off_8")
        for key in order:
            n = E2E_CLIENTS if key.endswith("_8") else 1
            wall, results = _e2e_once(engine, prompts(n), cache=key.startswith("on"))
            out[key].append(n * E2E_NEW / wall)
            if key == "on_8":
                cached.append(statistics.mean(r.cached_tokens for r in results))
    return {
        "gen_tok_s_8_cache_off": statistics.median(out["off_8"]),
        "gen_tok_s_8_cache_on": statistics.median(out["on_8"]),
        "gen_tok_s_1_cache_off": statistics.median(out["off_1"]),
        "runs": out,
        "cached_tokens_mean": statistics.mean(cached),
    }


TASKS = {"decode": task_decode, "prefill": task_prefill, "e2e": task_e2e}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.anchor_engine", description=__doc__.split("\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--profile", choices=PROFILES, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", default="", help="k=v,... (" + "; ".join(VARIANT_KEYS) + ")")
    args = ap.parse_args(argv)
    variant = parse_variant(args.variant)
    variant.pop("engine", None)  # bench.llamacpp ran this process on that engine's code already
    t = time.perf_counter()
    engine = load_engine(args.bundle, args.profile, variant)
    load_s = time.perf_counter() - t
    result = TASKS[args.task](engine, args.repeats)
    result |= {"load_s": load_s, "variant": variant, "pid": os.getpid()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
