"""Update benchmark: a fine-tune and a revert through the real hub, mosquitto and ``edge-agent run``.

    python -m bench.update [--quick] --json FILE

A random-weight GlmForCausalLM with the real GLM-Edge-1.5B shape (``--quick``: a small model) is
exported with the fused int4 route (block 32) as ``1.0.0``. ``1.1.0`` is a fine-tune of it: 10% of
the tensors (chosen by a seeded draw) change as a re-export after a fine-tune changes them: about a
tenth of the int4 nibbles move by one step and every scale moves by ~0.1%. Each version carries its
own golden smoke test (the greedy tokens ONNX Runtime produces for it). Then, over a mosquitto
started here and the hub's gateway (in this process, SQLite):

    update     box A runs 1.0.0 (installed at first start); desired 1.1.0 -> committed
    revert     box A, desired 1.0.0 again (the version its other slot holds) -> committed
               (a sensor asks the golden prompt before each switch: the engine reverted to has
               it in its prefix cache, and its smoke test must not be fooled by that path)
    full       box B starts empty; desired 1.1.0 -> committed: the whole bundle on the wire

Measured (JSON keys):
    update_bytes            bytes the hub sent box A for the update (frames: headers included)
    planner_bytes           the planner's cost for that pair, with real encodings (what a
                            dry run shows), and ``update_vs_planner`` = update_bytes / planner_bytes
    full_bytes              bytes the hub sent box B, and ``update_vs_full``
    update_s, full_s        seconds from publishing the desired state to the committed report
    revert_s                the same for the revert; ``revert_pieces_fetched`` pieces it fetched
Medians are not needed here: each number is one transfer, timed end to end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.infer import GLM_EDGE_15B, QUICK, write_checkpoint
from bench.serve import write_profile

SMOKE_PROMPT = "The pressure sensor on line three reported"
SMOKE_TOKENS = 16


def _seal(folder: Path, key: Any, version: str, profile: str, runtime: dict[str, Any], smoke: Any) -> Any:
    from edgeglm.bundle_files import seal_folder

    (folder / "manifest.json").unlink(missing_ok=True)
    return seal_folder(
        folder,
        key,
        model="glm-edge-1.5b-random",
        version=version,
        profile=profile,
        runtime=runtime,
        quality={"passed": True, "note": "bench bundle: random weights, not gated"},
        smoke_test=smoke,
    )


def seal_with_smoke(
    folder: Path, key: Any, version: str, profile: Path, runtime: dict[str, Any], prompt: str = SMOKE_PROMPT
) -> None:
    """Seal with the golden smoke test the exporter records (tokens, logits, tolerance)."""
    from tokenizers import Tokenizer

    from edgeglm.profiles import load_profile
    from export.ort_runner import OrtDecoder
    from export.smoke import golden_smoke_test

    prof = load_profile(profile)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids
    eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
    stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    smoke = golden_smoke_test(OrtDecoder(folder / "model.onnx"), prompt, ids, SMOKE_TOKENS, stop)
    _seal(folder, key, version, prof.name, runtime, smoke)


def build_v1(
    ckpt: Path, out: Path, key: Any, profile: Path, max_context: int, prompt: str = SMOKE_PROMPT
) -> Path:
    from export.architectures import architecture_for
    from export.checkpoint import Checkpoint
    from export.fused import FusedOptions, build_fused

    out.mkdir(parents=True)
    c = Checkpoint(ckpt)
    arch = architecture_for(c.config)
    spec = arch.spec(c.config)
    build_fused(
        c,
        arch,
        spec,
        FusedOptions(weights="int4", block_size=32, accuracy_level=4, max_context=max_context),
        out,
    )
    for path in [ckpt / "config.json", *c.tokenizer_files()]:
        shutil.copy2(path, out / path.name)
    kv = {"layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim, "dtype": "fp32"}
    seal_with_smoke(out, key, "1.0.0", profile, {"graph": "fused", "kv_cache": kv}, prompt)
    return out


def _nudge(nibbles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    moved = (rng.random(nibbles.shape) < 0.1) * rng.choice(np.array([-1, 1], np.int16), nibbles.shape)
    return np.clip(nibbles.astype(np.int16) + moved, 0, 15).astype(np.uint8)


def fine_tune(v1: Path, out: Path, key: Any, profile: Path, fraction: float = 0.1, seed: int = 11) -> Path:
    """``v1`` with ``fraction`` of its tensors changed as a fine-tune's re-export changes them."""
    from edgeglm.bundle import load_manifest
    from edgeglm.onnx_tensors import read_external_tables

    shutil.copytree(v1, out)
    rng = np.random.default_rng(seed)
    changed = 0
    for rel, tensors in read_external_tables(out).items():
        chosen = [t for t in tensors if rng.random() < fraction]
        with open(out / rel, "r+b") as fh:
            for t in chosen:
                fh.seek(t.offset)
                raw = bytearray(fh.read(t.length))
                if t.dtype == "uint8":  # packed int4: a tenth of the nibbles step by one
                    arr = np.frombuffer(bytes(raw), np.uint8)
                    new = (_nudge(arr >> 4, rng) << 4) | _nudge(arr & 0x0F, rng)
                elif t.dtype in ("float32", "float16"):
                    dt = np.float32 if t.dtype == "float32" else np.float16
                    arr = np.frombuffer(bytes(raw), dt)
                    new = (arr * (1 + 1e-3 * rng.standard_normal(arr.shape))).astype(dt)
                else:
                    continue
                fh.seek(t.offset)
                fh.write(new.tobytes())
                changed += 1
    m, _ = load_manifest(v1, None)
    prompt = m.smoke_test.prompt if m.smoke_test else SMOKE_PROMPT
    seal_with_smoke(out, key, "1.1.0", profile, m.runtime.model_dump(mode="json"), prompt)
    print(f"fine-tune changed {changed} tensors", file=sys.stderr)
    return out


def _span(path: Path, t: Any) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(t.offset)
        return fh.read(t.length)


class _Box:
    def __init__(
        self,
        root: Path,
        device: str,
        port: int,
        public: Path,
        profile: Path,
        bootstrap: Path | None,
        fleet_public: Path,
    ):
        from edgectl.demo.agent_box import AgentBox  # the one harness: the demo's and the tests'

        root.mkdir(parents=True)
        extra: dict[str, Any] = {
            "profile": str(profile),
            "fleet_keys": [str(fleet_public)],
            "log_level": "debug",
            "update": {"request_timeout_s": 30.0},  # the shipped default: no re-asks of slow batches
        }
        if bootstrap is not None:
            extra["bootstrap_bundle"] = str(bootstrap)
        self.proc = AgentBox(root, device, port, public, **extra)


def _transfer(
    ctx: Any, wire: Any, box: Any, folder: Path, rollout: int, timeout: float = 1800
) -> dict[str, float]:
    from edgectl.demo.procs import wait_for

    sent0 = ctx.metrics.value("edgeglm_hub_data_bytes_sent_total")
    pieces0 = len(box.proc.verified_pieces())
    t0 = time.perf_counter()
    wire.desire(folder, rollout)
    wait_for(
        lambda: any(s in ("committed", "failed") for s, _ in wire.steps(rollout)),
        timeout,
        f"rollout {rollout}",
        0.01,
    )
    seconds = time.perf_counter() - t0
    if ("committed", True) not in wire.steps(rollout):
        raise RuntimeError(
            f"rollout {rollout} did not commit: {wire.steps(rollout)}\n{box.proc.log()[-3000:]}"
        )
    return {
        "bytes": ctx.metrics.value("edgeglm_hub_data_bytes_sent_total") - sent0,
        "seconds": seconds,
        "pieces": len(box.proc.verified_pieces()) - pieces0,
    }


def _hub_records(ctx: Any, device_id: str) -> Any:
    """``Wire(record=...)``: the desired release recorded in the hub's database before the wire
    publishes it, as the hub does (its gateway serves a device only the releases targeted at it)."""

    def record(manifest: Any, _rollout_id: int) -> None:
        from cloud_hub.desired import publish_desired
        from cloud_hub.models import Device
        from edgectl.demo.procs import wait_for

        def device() -> Any:
            with ctx.db.session() as s:
                d = s.get(Device, device_id)
                return d is not None and d.profile is not None

        wait_for(device, 60, f"{device_id} registered with the hub")
        with ctx.db.session() as s:
            d = s.get(Device, device_id)
            publish_desired(s, d, manifest.model, manifest.version, None, None, fleet=ctx.fleet)

    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.update", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model instead of GLM-Edge-1.5B dimensions")
    ap.add_argument("--json", type=Path, required=False)
    ap.add_argument("--work", type=Path, help="keep the bundles (and the agents' logs) in this folder")
    args = ap.parse_args(argv)
    if shutil.which("mosquitto") is None:
        print("bench.update needs mosquitto: apt-get install mosquitto", file=sys.stderr)
        return 69
    from cloud_hub.db import migrate
    from cloud_hub.registry import Registry
    from cloud_hub.server import build_context, start_ingest
    from cloud_hub.settings import HubSettings
    from edgectl.demo.procs import ManagedBroker
    from edgectl.demo.wire import Wire
    from edgeglm.bundle import load_manifest
    from edgeglm.bundle_files import FolderSource
    from edgeglm.keys import create_keypair, load_private_key
    from edgeglm.mqtt import BrokerSettings
    from edgeglm.onnx_tensors import read_external_tables
    from edgeglm.planner import SourceChain, plan

    dims = QUICK if args.quick else GLM_EDGE_15B
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        work = args.work or Path(tmp)
        t = time.perf_counter()
        bundles = work / "bundles"
        public = bundles / "keys" / "bench.pub"
        profile = bundles / "bench-cpu-x86-int4.toml"
        v1, v11 = bundles / "v1", bundles / "v11"
        if not (v11 / "manifest.json").exists():  # built once per --work folder
            shutil.rmtree(bundles, ignore_errors=True)
            bundles.mkdir(parents=True)
            private, public, _ = create_keypair(bundles / "keys", "bench")
            key = load_private_key(private)
            write_profile(profile, 1024)
            ckpt = write_checkpoint(bundles / "ckpt", dims)
            build_v1(ckpt, v1, key, profile, 1024)
            fine_tune(v1, v11, key, profile)
            shutil.rmtree(bundles / "ckpt")
        for stale in ("box-a", "box-b", "hub"):
            shutil.rmtree(work / stale, ignore_errors=True)
        for stale in work.glob("hub.db*"):
            stale.unlink()
        m1, m11 = load_manifest(v1, None)[0], load_manifest(v11, None)[0]
        tensors = sum(len(ts) for ts in read_external_tables(v1).values())
        changed = sum(
            1
            for rel, ts in read_external_tables(v1).items()
            for t in ts
            if _span(v1 / rel, t) != _span(v11 / rel, t)
        )
        estimate = plan(m11, [m1], source=SourceChain(FolderSource.of(v11, m11), FolderSource.of(v1, m1)))
        print(f"bundles built in {time.perf_counter() - t:.0f}s", file=sys.stderr)

        broker = ManagedBroker(work / "broker").start()
        db = f"sqlite:///{work / 'hub.db'}"
        migrate(db)
        ctx = build_context(HubSettings(data_dir=work / "hub", db_url=db, trusted_keys=(public,)))
        for folder in (v1, v11):
            with ctx.db.session() as s:
                Registry(s, ctx.store, ctx.trusted).publish_folder(folder, "bench")
        link, ingest = start_ingest(ctx, BrokerSettings(port=broker.port), "bench-hub")
        boxes: list[Any] = []
        try:
            fleet_key = work / "fleet" / "fleet.key"  # the hub's key for desired states
            if not fleet_key.exists():
                create_keypair(fleet_key.parent, "fleet")
            fleet_public = fleet_key.with_suffix(".pub")
            a = _Box(work / "box-a", "bench-a", broker.port, public, profile, v1, fleet_public)
            boxes.append(a)
            wire_a = Wire(broker.port, "bench-a", fleet_key, record=_hub_records(ctx, "bench-a"))
            a.proc.start()
            a.proc.wait_log(r"edge agent \S+ up", 600)
            # A sensor asks the golden question before each switch, so the serving engine's prefix
            # cache holds it when that engine is smoke-tested again (the revert reuses it).
            wire_a.ask(SMOKE_PROMPT)
            update = _transfer(ctx, wire_a, a, v11, 1)
            wire_a.ask(SMOKE_PROMPT)
            revert = _transfer(ctx, wire_a, a, v1, 2)
            b = _Box(work / "box-b", "bench-b", broker.port, public, profile, None, fleet_public)
            boxes.append(b)
            wire_b = Wire(broker.port, "bench-b", fleet_key, record=_hub_records(ctx, "bench-b"))
            b.proc.start()
            b.proc.wait_log(r"edge agent \S+ up", 120)
            full = _transfer(ctx, wire_b, b, v11, 3)
            log_a = a.proc.log()
        finally:
            for box in boxes:
                box.proc.stop()
            link.close()
            ingest.stop()
            ctx.gateway.close()
            ctx.db.dispose()
            broker.stop()
        bundle_mb = sum(p.stat().st_size for p in v1.iterdir()) / 1e6
    timings = re.findall(r"smoke test of \S+: agreement ([\d.]+) \(need [\d.]+\) in ([\d.]+)s", log_a)
    result: dict[str, Any] = {
        "model": "quick" if args.quick else "glm-edge-1.5b",
        "route": "fused-int4-b32",
        "bundle_mb": round(bundle_mb, 1),
        "tensors": tensors,
        "tensors_changed": changed,
        "update_bytes": int(update["bytes"]),
        "planner_bytes": int(estimate.bytes_to_send),
        "planner_mode": estimate.mode,
        "full_bytes": int(full["bytes"]),
        "update_s": round(update["seconds"], 3),
        "full_s": round(full["seconds"], 3),
        "revert_s": round(revert["seconds"], 3),
        "revert_pieces_fetched": int(revert["pieces"]),
        "revert_bytes": int(revert["bytes"]),
        "update_pieces_fetched": int(update["pieces"]),
        "smoke_agreements": [float(a) for a, _ in timings],
    }
    result["update_vs_planner"] = round(result["update_bytes"] / max(1, result["planner_bytes"]), 4)
    result["update_vs_full"] = round(result["update_bytes"] / max(1, result["full_bytes"]), 4)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
