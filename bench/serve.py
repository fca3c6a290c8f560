"""Serving benchmark: the edge agent over a real mosquitto against transformers fp32.

    python -m bench.serve [--quick] --json FILE

A random-weight GlmForCausalLM with the real GLM-Edge-1.5B shape (``--quick``: a small model;
see ``bench.infer``) is exported with the fused int4 route in the shipped ``cpu-x86-int4`` layout
(``FusedOptions.for_profile``: block, 8-bit head and first layer; rounded by the scale search, not
GPTQ: the same bytes and kernel), and sealed as a bundle for
``bench-cpu-x86-int4``: that profile with ``max_batch_size = 8`` so that eight clients can decode
together (``--max-batch-size 4``: the shipped profile's own). Speed does not depend on the
weights. Then, each in its own process:

    baseline      transformers generate(), fp32, batch 1: 32-token prompt, 64 new tokens
    agent         ``edgectl agent serve`` on a mosquitto started here (set_tcp_nodelay true)
    clients       paho MQTT 5 sensors in this process

Requests are what a site's sensors send: one fixed instruction (``HEAD``) and a reading that no
other request repeats, 64 new tokens each. The profile's prefix cache serves the head; a second
agent with ``prefix_cache_mb = 0`` repeats the aggregate runs to show what the cache is worth.

Measured (JSON keys):
    baseline_tok_s          transformers decode tokens/s, batch 1
    decode_tok_s            agent decode tokens/s at batch 1 (engine timings in the replies)
    ttft_s                  time to first token seen by a streaming sensor (median)
    agg_tok_s_1             completion tokens/s, one sensor sending requests back to back
    agg_tok_s_8             the same with eight sensors at once (the two loads run in turn,
                            five times; agg_8_vs_1_runs holds each turn's ratio)
    prompt_tokens_mean      prompt tokens per request in the last 8-sensor run, and of them
    cached_tokens_mean      the ones reused from the prefix cache
    mqtt_overhead_p50_ms    sensor round trip minus the agent's own total_ms, 1-token requests
    mqtt_overhead_p99_ms
    peak_rss_mb             the agent process's peak resident memory (VmHWM)
    *_no_prefix_cache       agg_tok_s_1, agg_tok_s_8, ... from the agent without a prefix cache
plus the ratios ``decode_vs_baseline``, ``agg_8_vs_1`` and ``agg_8_vs_1_no_prefix_cache``.
Medians over repeats throughout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.infer import GLM_EDGE_15B, QUICK, shipped_layout, write_checkpoint

# What a site's sensors send: one fixed instruction around a reading that differs every time.
HEAD = (
    "You are the maintenance assistant of plant two. Read the sensor report and answer in one short"
    " sentence: is it a fault, and what should the operator check first? Report: "
)
NEW = 64
_readings = itertools.count()


def sensor_prompt() -> str:
    """The fixed head and a reading no other request in this run has."""
    i = next(_readings)
    return f"{HEAD}pressure sensor P-{i} on line {i % 5 + 1} reads {4 + (i * 37) % 50 / 10:.1f} bar."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_bundle(ckpt: Path, out: Path, max_context: int) -> Path:
    """Fused int4 graph (quantized as ``cpu-x86-int4`` says) + tokenizer files, sealed and signed."""
    from edgeglm.bundle_files import seal_folder
    from edgeglm.keys import create_keypair, load_private_key
    from export.architectures import architecture_for
    from export.checkpoint import Checkpoint
    from export.fused import build_fused

    out.mkdir(parents=True)
    c = Checkpoint(ckpt)
    arch = architecture_for(c.config)
    spec = arch.spec(c.config)
    build_fused(c, arch, spec, shipped_layout("cpu-x86-int4", max_context=max_context), out)
    for path in [ckpt / "config.json", *c.tokenizer_files()]:
        shutil.copy2(path, out / path.name)
    private, _, _ = create_keypair(out.parent / "keys", "bench")
    kv = {"layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim, "dtype": "fp32"}
    seal_folder(
        out,
        load_private_key(private),
        model="glm-edge-1.5b-random",
        version="1.0.0",
        profile="bench-cpu-x86-int4",
        runtime={"graph": "fused", "kv_cache": kv},
    )
    return out


def write_profile(
    path: Path, max_context: int, prefix_cache_mb: int | None = None, max_batch_size: int = 8
) -> Path:
    """``cpu-x86-int4`` as ``bench-cpu-x86-int4``: ``max_batch_size`` (8 unless asked),
    ``max_context``, maybe another prefix cache."""
    from edgeglm.profiles import profiles_dir

    text = (profiles_dir() / "cpu-x86-int4.toml").read_text()
    changes = [
        ("name", '"bench-cpu-x86-int4"'),
        ("max_batch_size", str(max_batch_size)),
        ("max_context", str(max_context)),
    ]
    if prefix_cache_mb is not None:
        changes.append(("prefix_cache_mb", str(prefix_cache_mb)))
    for key, value in changes:
        text, n = re.subn(rf"^{key} = \S+", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, f"cpu-x86-int4.toml has no {key}"
    path.write_text(text)
    return path


def baseline_worker(ckpt: Path) -> None:
    """transformers fp32 at batch 1, timed as ``bench.infer`` times it (warm, by token arrival)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from bench.infer import timed_generate, warm_up

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    speeds = []
    for seed in range(2):
        ids = torch.from_numpy(np.random.default_rng(seed).integers(2, vocab, (1, 32), dtype=np.int64))
        warm_up(model, ids)
        _, decode = timed_generate(model, ids)
        speeds.append((NEW - 1) / decode)
    print(json.dumps({"baseline_tok_s": statistics.median(speeds)}))


class _Client:
    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.paho = paho
        self.topic = f"bench/{uuid.uuid4().hex[:8]}/reply"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_socket_open = lambda _c, _u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.on_message = self._on_message
        self._ready = threading.Event()
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.topic, 1)
        assert self._ready.wait(10)
        self._cond = threading.Condition()
        self._parts: list[tuple[float, dict[str, Any]]] = []

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._cond:
            self._parts.append((time.perf_counter(), json.loads(msg.payload)))
            self._cond.notify_all()

    def ask(
        self, topic: str, request: dict[str, Any], timeout: float = 600.0
    ) -> tuple[float, float | None, dict[str, Any]]:
        """Send one request, wait for its final reply: (seconds, seconds to first part, final)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic
        props.CorrelationData = uuid.uuid4().bytes
        with self._cond:
            self._parts.clear()
        t0 = time.perf_counter()
        self.client.publish(topic, json.dumps(request).encode(), qos=1, properties=props)
        with self._cond:
            while not (self._parts and self._parts[-1][1].get("done")):
                if not self._cond.wait(timeout):
                    raise TimeoutError("no reply from the agent")
            first, final = self._parts[0][0], self._parts[-1]
        if final[1].get("error"):
            raise RuntimeError(f"agent error: {final[1]['error']}")
        return final[0] - t0, (first - t0) if request.get("stream") else None, final[1]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_agent(
    bundle: Path, profile: Path, quick: bool, *, aggregates_only: bool = False
) -> dict[str, Any]:
    from edgectl.demo.procs import ManagedBroker, Proc, tool

    broker = ManagedBroker(bundle.parent / "broker").start()
    port = broker.port
    argv = [
        tool("edgectl"), "agent", "serve", str(bundle), "--device-id", "bench",
        "--broker", f"127.0.0.1:{port}", "--profile", str(profile), "--queue-size", "64",
        "--trust", str(bundle.parent / "keys" / "bench.pub"),  # the key build_bundle sealed it with
    ]  # fmt: skip
    agent = Proc("edgectl agent serve", argv, bundle.parent / "agent.log").start()
    topic = "edgeglm/v1/dev/bench/infer"
    clients: list[_Client] = []
    try:
        time.sleep(0.5)
        clients = [_Client(port) for _ in range(8)]
        deadline = time.time() + 600
        while True:  # the agent is up once it answers
            try:
                clients[0].ask(topic, {"prompt": "warm up", "max_tokens": 2}, timeout=5)
                break
            except TimeoutError:
                if time.time() > deadline or not agent.alive():
                    raise
        rounds = 2 if quick else 3
        result: dict[str, Any] = {}
        if not aggregates_only:
            singles = [
                clients[0].ask(topic, {"prompt": sensor_prompt(), "max_tokens": NEW, "stream": True})
                for _ in range(rounds)
            ]
            result["ttft_s"] = statistics.median(s[1] for s in singles if s[1] is not None)
            result["decode_tok_s"] = statistics.median(
                (s[2]["usage"]["completion_tokens"] - 1) / (s[2]["timings"]["decode_ms"] / 1000)
                for s in singles
            )
        usages: list[dict[str, int]] = []
        failures: list[BaseException] = []

        def run(client: _Client) -> None:
            try:
                for _ in range(rounds):
                    usages.append(
                        client.ask(topic, {"prompt": sensor_prompt(), "max_tokens": NEW})[2]["usage"]
                    )
            except BaseException as exc:  # a sensor thread's failure must fail the run, not thin it
                failures.append(exc)

        def load(sensors: list[_Client]) -> float:
            """Completion tokens/s while ``sensors`` each send ``rounds`` requests back to back."""
            usages.clear()
            threads = [threading.Thread(target=run, args=(c,)) for c in sensors]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if failures:
                raise failures[0]
            return sum(u["completion_tokens"] for u in usages) / (time.perf_counter() - t)

        # One sensor, then eight, in turn: a neighbour's load on a shared machine then falls on
        # both sides of the ratio instead of on one of them.
        ones: list[float] = []
        eights: list[float] = []
        for _ in range(2 if quick else 5):
            ones.append(load(clients[:1]))
            eights.append(load(clients))
        result["agg_tok_s_1"] = statistics.median(ones)
        result["agg_tok_s_8"] = statistics.median(eights)
        result["agg_8_vs_1_runs"] = [e / o for o, e in zip(ones, eights, strict=True)]
        result["prompt_tokens_mean"] = statistics.mean(u["prompt_tokens"] for u in usages)
        result["cached_tokens_mean"] = statistics.mean(u.get("cached_tokens", 0) for u in usages)
        if not aggregates_only:
            overheads = []
            for _ in range(60 if quick else 100):
                rtt, _, final = clients[0].ask(topic, {"prompt": "The pump", "max_tokens": 1})
                overheads.append(rtt * 1000 - final["timings"]["total_ms"])
            overheads.sort()
            result["mqtt_overhead_p50_ms"] = statistics.median(overheads)
            result["mqtt_overhead_p99_ms"] = overheads[min(len(overheads) - 1, int(len(overheads) * 0.99))]
        assert agent.pid is not None
        result["peak_rss_mb"] = _rss_peak_mb(agent.pid)
        return result
    finally:
        for c in clients:
            c.close()
        agent.stop(grace=30)
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model instead of GLM-Edge-1.5B dimensions")
    ap.add_argument("--json", type=Path, required=False)
    ap.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="the agent's max_batch_size (default 8; the shipped cpu-x86-int4 says 4); 8 sensors either way",
    )
    ap.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_batch_size < 1:
        ap.error("--max-batch-size must be at least 1")
    if args.baseline_worker:
        baseline_worker(args.baseline_worker)
        return 0
    if shutil.which("mosquitto") is None:
        print("bench.serve needs mosquitto: apt-get install mosquitto", file=sys.stderr)
        return 69
    dims = QUICK if args.quick else GLM_EDGE_15B
    max_context = 1024
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        ckpt = write_checkpoint(work / "ckpt", dims)
        bundle = build_bundle(ckpt, work / "bundle", max_context)
        bundle_mb = sum(p.stat().st_size for p in bundle.iterdir()) / 1e6
        print(f"bundle built in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        out = subprocess.run(
            [sys.executable, "-m", "bench.serve", "--baseline-worker", str(ckpt)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        result: dict[str, Any] = {
            "model": "quick" if args.quick else "glm-edge-1.5b",
            "route": "fused-int4 as cpu-x86-int4",
            "max_batch_size": args.max_batch_size,
            "bundle_mb": bundle_mb,
        }
        result |= json.loads(out.stdout.strip().splitlines()[-1])
        result |= measure_agent(
            bundle,
            write_profile(work / "bench-cpu-x86-int4.toml", max_context, max_batch_size=args.max_batch_size),
            args.quick,
        )
        # The same bundle and loads with the prefix cache off: what the cache is worth here.
        no_cache = write_profile(work / "no-prefix-cache.toml", max_context, 0, args.max_batch_size)
        off = measure_agent(bundle, no_cache, args.quick, aggregates_only=True)
        result |= {f"{k}_no_prefix_cache": v for k, v in off.items()}
    result["decode_vs_baseline"] = result["decode_tok_s"] / result["baseline_tok_s"]
    result["agg_8_vs_1"] = result["agg_tok_s_8"] / result["agg_tok_s_1"]
    result["agg_8_vs_1_no_prefix_cache"] = (
        result["agg_tok_s_8_no_prefix_cache"] / result["agg_tok_s_1_no_prefix_cache"]
    )
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
