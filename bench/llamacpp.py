"""The llama.cpp anchor: our engine against llama.cpp on the same box, same weights, same run.

    python -m bench.llamacpp --json FILE [--quick] [--rounds 3] [--only decode,prefill,e2e]
                             [--variant TASK:WEIGHTS:k=v,...]...

What an operator would run instead of our agent on a CPU box is llama.cpp. This bench builds it
from the llama-cpp-python sdist (``bench.anchor_build``: native flags, cached under
``~/.cache/edgeglm-bench/llamacpp``), writes the bench checkpoint (``bench.infer``: random weights,
GLM-Edge-1.5B dimensions; ``--quick``: a small model), converts it with llama.cpp's own converter
and quantizes Q4_0, Q4_K_M and Q8_0 (``bench.gguf_convert``), exports our bundles as the shipped
``cpu-x86-int4`` and ``cpu-x86-int8`` profiles say (``bench.anchor_engine``), then runs rounds.

Each round runs every measurement once, one process each, in pairs (llama.cpp, ours) whose order
flips every round (A B, then B A), with a read-bandwidth probe (``bench.membw``) right before and
right after each and the CPU time other processes used during it recorded (``bench.cpu_share``):

    decode    llama-bench -t T -p 0 -n 64 (Q4_0, Q4_K_M, Q8_0)  | our batch-1 decode, 64 steps
    prefill   llama-bench -t T -p 256 -n 0 (Q4_0)               | our prefill of 256 tokens (int4)
    e2e       llama-batched-bench -npp 70 -ntg 64 -npl 1,8 (Q4_0): 8 x 64 generated tokens over the
              whole run (prefill included)                     | 8 requests at once through our
              scheduler, prefix cache off (like for like) and on; one request alone

A ratio is ours over llama.cpp within one round; the summary gives the median of those pair
ratios and their range. Decode is also put against the roofline: tokens/s times the weight bytes
one token reads (``bench.weights_read``) over the larger of the two probes around the run. A shared
host's bandwidth moves in phases (measured on a 2-core EPYC: 30 GB/s for minutes, then 50), and a
phase that changes between a probe and the run must not make a slow run look fast: a run whose
probes disagree by more than 15% is left out of the roofline shares (its ratios still count).

llama.cpp's fastest build is its native one; on a CPU whose AMX the VM does not grant, its
native kernels die with SIGILL on batched work. A tiny batched run decides: where it fails, a
second build with explicit AVX-512 flags and AMX off runs prefill and e2e (the JSON and the table
say which build gave which figure).

``--variant decode:int4:spin=0`` adds our engine with a runtime lever changed (keys:
``bench.anchor_engine.VARIANT_KEYS``), paired with the unchanged engine in the same round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import anchor_build, membw
from bench.cpu_share import measured
from bench.weights_read import gguf_read_bytes, gguf_tensors, onnx_initializers, onnx_read_bytes

QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")
WEIGHTS = {"int4": "cpu-x86-int4", "int8": "cpu-x86-int8"}
TASKS = ("decode", "prefill", "e2e")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """One line of the issue's bar: ``metric`` (a summary key) at least ``at_least``."""

    metric: str
    at_least: float
    text: str


TARGETS = (
    Target("decode:int4/Q4_0", 1.15, "int4 decode >= 1.15x llama.cpp Q4_0"),
    Target("decode:int4/Q4_K_M", 1.15, "int4 decode >= 1.15x llama.cpp Q4_K_M"),
    Target("decode:int8/Q8_0", 1.0, "int8 decode >= 1.0x llama.cpp Q8_0"),
    Target("roofline:int8", 0.90, "int8 decode >= 90% of the read roofline"),
    Target("roofline:int4", 0.80, "int4 decode >= 80% of the read roofline (goal)"),
    Target("e2e:int4-8-cache-off/Q4_0-8", 1.3, "8 clients end to end >= 1.3x batched-bench (cache off)"),
    Target("prefill:int4/Q4_0", 1.0, "prefill 256 >= 1.0x llama.cpp pp256"),
)


# ------------------------------------------------------------------------------ pure parts
def pair_ratios(rounds: Sequence[dict[str, float]], num: str, den: str) -> list[float]:
    """``num / den`` within each round that has both (a failed run leaves its round out)."""
    return [r[num] / r[den] for r in rounds if r.get(num) and r.get(den)]


PHASE_TOLERANCE = 0.15  # probes around one run further apart than this: the bandwidth changed phase


def steady_bandwidth(before: float, after: float | None) -> float | None:
    """The roofline's denominator for one run: the larger probe around it, or None when the two
    disagree by more than ``PHASE_TOLERANCE`` (the box's bandwidth changed during the run)."""
    if after is None:  # a results file from before the second probe
        return before
    high, low = max(before, after), min(before, after)
    return high if low >= (1 - PHASE_TOLERANCE) * high else None


def summarize(values: Sequence[float]) -> dict[str, Any] | None:
    """Median and range of ``values``; None when there are none."""
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def parse_variant_arg(text: str) -> tuple[str, str, str]:
    """``"decode:int4:spin=0"`` -> ``("decode", "int4", "spin=0")``; checked against what runs."""
    from bench.anchor_engine import parse_variant

    task, weights, spec = [*text.split(":", 2), "", ""][:3]
    if task not in TASKS or weights not in WEIGHTS or not spec:
        raise ValueError(f"variant {text!r} is not TASK:WEIGHTS:k=v,... ({'|'.join(TASKS)}; int4|int8)")
    parse_variant(spec)  # refuses unknown keys now, not in round 2
    return task, weights, spec


# ------------------------------------------------------------------------------------ setup
@dataclass
class Setup:
    native: anchor_build.Build
    batched: anchor_build.Build
    batched_note: str
    gguf: dict[str, Path]
    bundles: dict[str, Path]
    bytes_per_token: dict[str, int] = field(default_factory=dict)


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _export_digest() -> str:
    """Our bundles are rebuilt when the exporter or the shipped profiles change."""
    h = hashlib.sha256()
    sources = [*(REPO / "export").glob("*.py"), *(REPO / "edgeglm" / "device_profiles").glob("*.toml")]
    for path in sorted(sources):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:10]


def batched_runs(build: anchor_build.Build, gguf: Path, threads: int) -> tuple[bool, str]:
    """Whether ``build`` survives a tiny batched run here (AMX kernels SIGILL where the VM lacks AMX)."""
    cmd = [str(build.tool("llama-batched-bench")), "-m", str(gguf), "-t", str(threads)]
    cmd += ["-c", "128", "-npp", "16", "-ntg", "2", "-npl", "2", "--output-format", "jsonl"]
    proc, _ = measured(cmd, timeout=600)
    if proc.returncode == 0:
        return True, "ok"
    why = f"exit {proc.returncode}"
    if proc.returncode == -signal.SIGILL:
        why = "SIGILL (an instruction the CPU or VM does not grant, e.g. AMX tiles)"
    return False, why


def setup(work: Path, quick: bool, threads: int) -> Setup:
    from bench.anchor_engine import build_bundle
    from bench.gguf_convert import convert, quantize
    from bench.infer import GLM_EDGE_15B, QUICK, write_checkpoint

    native = anchor_build.ensure("native")
    _say(f"llama.cpp: {native.label} in {native.bin}")
    ckpt = work / "ckpt"
    if not (ckpt / "model.safetensors").exists():
        _say("writing the bench checkpoint (random weights)")
        write_checkpoint(ckpt, QUICK if quick else GLM_EDGE_15B)
    gdir = work / f"gguf-{native.version}"
    gdir.mkdir(parents=True, exist_ok=True)
    _say("converting with llama.cpp's convert_hf_to_gguf.py")
    bf16 = convert(native.src, ckpt, gdir / "model-BF16.gguf")
    tool = native.tool("llama-quantize")
    gguf = {q: quantize(tool, bf16, gdir / f"model-{q}.gguf", q, threads) for q in QUANTS}
    bdir = work / f"bundles-{_export_digest()}"
    bundles = {}
    for weights, profile in WEIGHTS.items():
        out = bdir / profile
        if not (out / "manifest.json").exists():
            _say(f"exporting our {profile} bundle")
            build_bundle(ckpt, out, profile)
        bundles[weights] = out
    ok, why = batched_runs(native, gguf["Q4_0"], threads)
    batched, note = native, "native build (a tiny batched run passed)"
    if not ok:
        _say(f"the native build fails batched work ({why}): building the AVX-512, AMX-off flavour")
        batched = anchor_build.ensure("avx512")
        note = f"avx512 build: the native one failed a tiny batched run with {why}"
    s = Setup(native, batched, note, gguf, bundles)
    for q, path in gguf.items():
        s.bytes_per_token[q] = gguf_read_bytes(gguf_tensors(path))
    for weights, path in bundles.items():
        s.bytes_per_token[weights] = onnx_read_bytes(onnx_initializers(path / "model.onnx"))
    return s


# ----------------------------------------------------------------------------- measurements
def _llama_bench(
    build: anchor_build.Build, gguf: Path, threads: int, pp: int, tg: int, reps: int
) -> dict[str, Any]:
    cmd = [str(build.tool("llama-bench")), "-m", str(gguf), "-t", str(threads)]
    cmd += ["-p", str(pp), "-n", str(tg), "-r", str(reps), "-o", "json"]
    proc, load = measured(cmd)
    row: dict[str, Any] = {"cmd": " ".join(cmd[1:]), "build": build.flavour, "load": load.as_dict()}
    if proc.returncode:
        return row | {"error": f"exit {proc.returncode}: {proc.stderr[-600:]}"}
    rec = json.loads(proc.stdout)[0]
    return row | {
        "tok_s": rec["avg_ts"],
        "tok_s_runs": rec["samples_ts"],
        "build_commit": rec.get("build_commit"),
        "cpu_info": rec.get("cpu_info"),
    }


def _llama_batched(build: anchor_build.Build, gguf: Path, threads: int) -> dict[str, Any]:
    from bench.anchor_engine import E2E_CLIENTS, E2E_NEW, E2E_PROMPT

    cmd = [str(build.tool("llama-batched-bench")), "-m", str(gguf), "-t", str(threads), "-c", "2048"]
    cmd += ["-npp", str(E2E_PROMPT), "-ntg", str(E2E_NEW), "-npl", f"1,{E2E_CLIENTS}"]
    cmd += ["--output-format", "jsonl"]
    proc, load = measured(cmd)
    row: dict[str, Any] = {"cmd": " ".join(cmd[1:]), "build": build.flavour, "load": load.as_dict()}
    if proc.returncode:
        return row | {"error": f"exit {proc.returncode}: {proc.stderr[-600:]}"}
    lines = [json.loads(x) for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("{")]
    by_pl = {rec["pl"]: rec for rec in lines}
    for pl, rec in by_pl.items():
        row[f"gen_tok_s_{pl}"] = pl * rec["tg"] / rec["t"]  # generated tokens over the whole run
        row[f"tg_phase_tok_s_{pl}"] = rec["speed_tg"]
        row[f"pp_phase_tok_s_{pl}"] = rec["speed_pp"]
    return row


def _engine_overlay(engine: Path) -> Path:
    """A folder whose ``edge_agent`` is ``engine``'s and everything else this checkout's: run from
    it, the worker measures another version of the engine (a code change's A/B) on the same bench."""
    if not (engine / "edge_agent" / "inference" / "engine.py").is_file():
        raise ValueError(f"{engine} holds no edge_agent package")
    overlay = (
        anchor_build.CACHE / "overlays" / hashlib.sha256(str(engine.resolve()).encode()).hexdigest()[:10]
    )
    overlay.mkdir(parents=True, exist_ok=True)
    for name, target in (("edge_agent", engine / "edge_agent"), ("bench", REPO / "bench")):
        link = overlay / name
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target.resolve())
    for name in ("edgeglm", "export"):
        if not (overlay / name).is_symlink():
            (overlay / name).symlink_to(REPO / name)
    return overlay


def _ours(task: str, bundle: Path, profile: str, repeats: int, variant: str = "") -> dict[str, Any]:
    from bench.anchor_engine import parse_variant

    cmd = [sys.executable, "-m", "bench.anchor_engine", task, "--bundle", str(bundle), "--profile", profile]
    cmd += ["--repeats", str(repeats), "--variant", variant]
    engine = parse_variant(variant).get("engine")
    proc, load = measured(cmd, cwd=_engine_overlay(Path(engine)) if engine else REPO)
    row: dict[str, Any] = {"cmd": " ".join(cmd[2:]), "load": load.as_dict()}
    if proc.returncode:
        return row | {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return row | json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Step:
    key: str  # e.g. "decode:Q4_0", "decode:int4", "decode:int4@spin=0"
    run: Callable[[], dict[str, Any]]
    value: str = "tok_s"  # the key of the result that the ratios use


def plan(s: Setup, args: argparse.Namespace, variants: list[tuple[str, str, str]]) -> list[list[Step]]:
    """The round's pairs, each (llama.cpp, ours) or (ours, ours with a lever)."""
    t, reps = args.llama_threads or args.threads, args.repeats
    nb, bb = s.native, s.batched
    groups: list[list[Step]] = []
    if "decode" in args.only:
        groups += [
            [Step("decode:Q4_0", lambda: _llama_bench(nb, s.gguf["Q4_0"], t, 0, 64, reps)),
             Step("decode:int4", lambda: _ours("decode", s.bundles["int4"], WEIGHTS["int4"], reps))],
            [Step("decode:Q4_K_M", lambda: _llama_bench(nb, s.gguf["Q4_K_M"], t, 0, 64, reps))],
            [Step("decode:Q8_0", lambda: _llama_bench(nb, s.gguf["Q8_0"], t, 0, 64, reps)),
             Step("decode:int8", lambda: _ours("decode", s.bundles["int8"], WEIGHTS["int8"], reps))],
        ]  # fmt: skip
    if "prefill" in args.only:
        groups.append(
            [Step("prefill:Q4_0", lambda: _llama_bench(bb, s.gguf["Q4_0"], t, 256, 0, reps)),
             Step("prefill:int4", lambda: _ours("prefill", s.bundles["int4"], WEIGHTS["int4"], reps))]
        )  # fmt: skip
    if "e2e" in args.only:
        e2e_reps = max(1, reps - 1)
        groups.append(
            [Step("e2e:Q4_0", lambda: _llama_batched(bb, s.gguf["Q4_0"], t), "gen_tok_s_8"),
             Step("e2e:int4", lambda: _ours("e2e", s.bundles["int4"], WEIGHTS["int4"], e2e_reps),
                  "gen_tok_s_8_cache_off")]
        )  # fmt: skip
    for task, weights, spec in variants:  # next to the unchanged engine's step of the same round
        r = reps if task != "e2e" else max(1, reps - 1)
        value = "gen_tok_s_8_cache_off" if task == "e2e" else "tok_s"
        base = f"{task}:{weights}"
        group = next((g for g in groups if any(st.key == base for st in g)), None)
        if group is None:
            group = [
                Step(base, lambda tk=task, w=weights, n=r: _ours(tk, s.bundles[w], WEIGHTS[w], n), value)
            ]
            groups.append(group)
        group.append(
            Step(
                f"{base}@{spec}",
                lambda tk=task, w=weights, n=r, v=spec: _ours(tk, s.bundles[w], WEIGHTS[w], n, v),
                value,
            )
        )
    return groups


def run_rounds(s: Setup, groups: list[list[Step]], rounds: int, threads: int) -> list[dict[str, Any]]:
    out = []
    for rnd in range(rounds):
        results: dict[str, Any] = {}
        for group in groups:
            for step in group if rnd % 2 == 0 else group[::-1]:
                bw = membw.read_gb_s(threads)
                res = step.run() | {"bw_before": bw, "value": step.value}
                res["bw_after"] = after = membw.read_gb_s(threads)
                results[step.key] = res
                v = res.get(step.value)
                shown = f"{v:8.2f}" if isinstance(v, float) else f"ERROR {res.get('error', '')[:300]}"
                _say(
                    f"round {rnd + 1}/{rounds} {step.key:28} {shown}  read bw {bw['median_gb_s']:.1f}"
                    f" / {after['median_gb_s']:.1f} GB/s  others used {res['load']['foreign_cpu_s']:.1f}"
                    f" cpu-s in {res['load']['wall_s']:.0f} s"
                )
        out.append(results)
    return out


def _values(rounds: list[dict[str, Any]]) -> list[dict[str, float]]:
    flat = []
    for r in rounds:
        row: dict[str, float] = {}
        for key, res in r.items():
            v = res.get(res["value"])
            if isinstance(v, float | int):
                row[key] = float(v)
            for extra in ("gen_tok_s_1", "gen_tok_s_8_cache_on", "gen_tok_s_1_cache_off", "tg_phase_tok_s_8"):
                if isinstance(res.get(extra), float | int):
                    row[f"{key}:{extra}"] = float(res[extra])
            if key.startswith("decode:") and "@" not in key and key in row:
                after = res.get("bw_after", {}).get("median_gb_s")
                bw = steady_bandwidth(res["bw_before"]["median_gb_s"], after)
                if bw is not None:
                    row[f"bw:{key}"] = bw
        flat.append(row)
    return flat


def summary(s: Setup, rounds: list[dict[str, Any]], variants: list[tuple[str, str, str]]) -> dict[str, Any]:
    vals = _values(rounds)
    out: dict[str, Any] = {}
    for key in sorted({k for r in vals for k in r}):
        out[f"value:{key}"] = summarize([r[key] for r in vals if key in r])
    pairs = {
        "decode:int4/Q4_0": ("decode:int4", "decode:Q4_0"),
        "decode:int4/Q4_K_M": ("decode:int4", "decode:Q4_K_M"),
        "decode:int8/Q8_0": ("decode:int8", "decode:Q8_0"),
        "prefill:int4/Q4_0": ("prefill:int4", "prefill:Q4_0"),
        "e2e:int4-8-cache-off/Q4_0-8": ("e2e:int4", "e2e:Q4_0"),
        "e2e:int4-8-cache-on/Q4_0-8": ("e2e:int4:gen_tok_s_8_cache_on", "e2e:Q4_0"),
    }
    for name, (num, den) in pairs.items():
        out[name] = summarize(pair_ratios(vals, num, den))
    # 8 clients over 1, each engine its own (llama.cpp: batched-bench's pl=8 over pl=1)
    for r in vals:
        if "e2e:int4" in r and "e2e:int4:gen_tok_s_1_cache_off" in r:
            r["e2e:int4:8v1"] = r["e2e:int4"] / r["e2e:int4:gen_tok_s_1_cache_off"]
        if "e2e:Q4_0" in r and "e2e:Q4_0:gen_tok_s_1" in r:
            r["e2e:Q4_0:8v1"] = r["e2e:Q4_0"] / r["e2e:Q4_0:gen_tok_s_1"]
    out["e2e:int4:8v1"] = summarize([r["e2e:int4:8v1"] for r in vals if "e2e:int4:8v1" in r])
    out["e2e:Q4_0:8v1"] = summarize([r["e2e:Q4_0:8v1"] for r in vals if "e2e:Q4_0:8v1" in r])
    for key, bytes_key in (("int4", "int4"), ("int8", "int8"), *((q, q) for q in QUANTS)):
        shares = [
            membw.share_of_roofline(r[f"decode:{key}"], s.bytes_per_token[bytes_key], r[f"bw:decode:{key}"])
            for r in vals
            if f"decode:{key}" in r and f"bw:decode:{key}" in r
        ]
        out[f"roofline:{key}"] = summarize(shares)
    for task, weights, spec in variants:
        base = f"{task}:{weights}"
        out[f"lever:{base}@{spec}"] = summarize(pair_ratios(vals, f"{base}@{spec}", base))
    return out


def _fmt(x: dict[str, Any] | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    if pct:
        return f"{100 * x['median']:.0f}% ({100 * x['min']:.0f}-{100 * x['max']:.0f})"
    return f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})"


def table(s: Setup, summ: dict[str, Any]) -> str:
    def v(key: str) -> dict[str, Any] | None:
        return summ.get(f"value:{key}")

    lines = [
        "| measurement | llama.cpp (build) | ours | ours / llama.cpp, median of pairs (range) |",
        "|---|---|---|---|",
    ]
    e2e_on = "e2e:int4:gen_tok_s_8_cache_on"
    rows = [  # label, llama.cpp value, ours, ratio, which llama.cpp build
        ("decode tok/s, batch 1: int4 vs Q4_0", "decode:Q4_0", "decode:int4", "decode:int4/Q4_0", s.native),
        (
            "decode tok/s, batch 1: int4 vs Q4_K_M",
            "decode:Q4_K_M",
            "decode:int4",
            "decode:int4/Q4_K_M",
            s.native,
        ),
        ("decode tok/s, batch 1: int8 vs Q8_0", "decode:Q8_0", "decode:int8", "decode:int8/Q8_0", s.native),
        (
            "prefill tok/s, 256 tokens: int4 vs Q4_0",
            "prefill:Q4_0",
            "prefill:int4",
            "prefill:int4/Q4_0",
            s.batched,
        ),
        (
            "8 clients, gen tok/s e2e, cache off",
            "e2e:Q4_0",
            "e2e:int4",
            "e2e:int4-8-cache-off/Q4_0-8",
            s.batched,
        ),
        ("8 clients, ... our prefix cache on", "e2e:Q4_0", e2e_on, "e2e:int4-8-cache-on/Q4_0-8", s.batched),
        ("1 client, gen tok/s e2e", "e2e:Q4_0:gen_tok_s_1", "e2e:int4:gen_tok_s_1_cache_off", "", s.batched),
    ]
    for label, lk, ok, ratio, build in rows:
        cells = _fmt(v(lk)), _fmt(v(ok)), _fmt(summ.get(ratio))
        lines.append(f"| {label} | {cells[0]} ({build.flavour}) | {cells[1]} | {cells[2]} |")
    eights = _fmt(summ.get("e2e:Q4_0:8v1")), _fmt(summ.get("e2e:int4:8v1"))
    lines.append(f"| 8 clients over 1, each engine its own | {eights[0]} | {eights[1]} | |")
    lines += [
        "",
        "| decode roofline (tok/s x bytes/token / probe GB/s) | bytes/token | share |",
        "|---|---|---|",
    ]
    for key in ("int4", "Q4_0", "Q4_K_M", "int8", "Q8_0"):
        share = _fmt(summ.get(f"roofline:{key}"), pct=True)
        lines.append(f"| {key} | {s.bytes_per_token[key] / 1e9:.3f} GB | {share} |")
    lines += ["", "| target | measured (median of pairs) | met |", "|---|---|---|"]
    for t in TARGETS:
        got = summ.get(t.metric)
        met = "-" if got is None else ("yes" if got["median"] >= t.at_least else "no")
        lines.append(f"| {t.text} | {_fmt(got, pct=t.metric.startswith('roofline'))} | {met} |")
    levers = [k for k in summ if k.startswith("lever:")]
    if levers:
        lines += ["", "| lever (ours with it / ours without, same round) | ratio |", "|---|---|"]
        lines += [f"| {k.removeprefix('lever:')} | {_fmt(summ[k])} |" for k in levers]
    return "\n".join(lines)


def _machine(threads: int) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    lines = cpuinfo.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {
        "cpu": name or platform.processor(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "isa": sorted(f for f in flags if f.startswith(("avx", "amx"))),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="a small model, 2 rounds, 2 repeats")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--repeats", type=int, help="runs per measurement within a round (default 3; quick 2)")
    ap.add_argument("--threads", type=int, default=2, help="our engine's intra-op threads (and llama.cpp's)")
    ap.add_argument(
        "--llama-threads",
        type=int,
        help="llama.cpp's -t when it differs (its spin barriers collapse when the box is oversubscribed)",
    )
    ap.add_argument("--only", default=",".join(TASKS), help="a subset of decode,prefill,e2e")
    ap.add_argument("--variant", action="append", default=[], help="TASK:WEIGHTS:k=v,... (a runtime lever)")
    ap.add_argument("--work", type=Path, help="where checkpoint, GGUF files and bundles are kept")
    args = ap.parse_args(argv)
    args.only = [t for t in args.only.split(",") if t]
    if bad := [t for t in args.only if t not in TASKS]:
        ap.error(f"unknown task(s) {bad} in --only; known: {', '.join(TASKS)}")
    try:
        variants = [parse_variant_arg(v) for v in args.variant]
    except ValueError as exc:
        ap.error(str(exc))
    rounds = args.rounds or (2 if args.quick else 3)
    args.repeats = args.repeats or (2 if args.quick else 3)
    work = args.work or anchor_build.CACHE / "work" / ("quick" if args.quick else "glm-edge-1.5b")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = setup(work, args.quick, args.threads)
    _say(f"setup done in {time.perf_counter() - t0:.0f} s; batched figures from the {s.batched_note}")
    rounds_out = run_rounds(s, plan(s, args, variants), rounds, args.threads)
    summ = summary(s, rounds_out, variants)
    result = {
        "bench": "llamacpp",
        "model": "quick" if args.quick else "glm-edge-1.5b (random weights)",
        "machine": _machine(args.threads),
        "llama_threads": args.llama_threads or args.threads,
        "llama_cpp": {
            "sdist": f"llama-cpp-python {s.native.version}",
            "decode_build": s.native.flavour,
            "batched_build": s.batched.flavour,
            "batched_note": s.batched_note,
        },
        "bytes_per_token": s.bytes_per_token,
        "rounds": rounds_out,
        "summary": summ,
        "targets": [
            {"target": t.text, "metric": t.metric, "at_least": t.at_least, "measured": summ.get(t.metric)}
            for t in TARGETS
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(s, summ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
