"""``edgectl demo``: the story so far, run for real on local files.

Today the demo covers export and the shared kernel: it trains a tiny GLM on the shipped corpus,
fine-tunes two of its tensors, exports both versions for ``cpu-x86-int8`` through the quality
gate into signed bundles, answers a sensor prompt with the exported graph, then plans the update,
sends every piece as binary wire frames of at most 128 KiB, verifies signature, frames, pieces
and files on the "device" side and rebuilds the new version byte-identical; two tampering
attempts must be refused. It says what is still to come rather than pretending: the agent, the
hub and MQTT. Needs the export extra (``make demo`` installs it).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgeglm.cli.output import emit, output_option, render_table

STILL_TO_COME = [
    "edge-agent inference over MQTT (issue 4)",
    "cloud-hub registry, rollouts and health gates (issue 5)",
    "OTA over MQTT with A/B slots and automatic rollback (issue 6)",
    "the whole story with three agents, waves and a revert (issue 7)",
]
# The fine-tune of the demo: the last layer's MLP, as a small domain adaptation would.
FINETUNED = ("model.layers.1.mlp.gate_up_proj.weight", "model.layers.1.mlp.down_proj.weight")
SENSOR_PROMPT = "Sensor report 7. Sensor P-12 on the pump in the north bay reads 9 bar."


@dataclass
class _Wire:
    frames: int = 0
    bytes: int = 0
    largest: int = 0
    rejected: list[str] = field(default_factory=list)


def _export_versions(work: Path, key_path: Path, say: Any) -> dict[str, Any]:
    """Train, fine-tune and export the two versions; returns ExportResults by version."""
    from edgeglm.errors import UnavailableError

    try:
        from export.pipeline import run_export
        from export.spec import ExportSpec
        from export.tiny_glm import build_checkpoint, finetune_checkpoint, heldout_prompts
    except ImportError as exc:
        raise UnavailableError(
            "demo", f"needs the export extra ({exc.name} is missing)", hint="Run it with 'make demo'."
        ) from exc
    from edgeglm.profiles import load_profile

    say("training a tiny GLM (GlmForCausalLM, GLM-Edge shape) on the shipped corpus")
    v1 = build_checkpoint(work / "checkpoints" / "1.0.0", "glm-edge", steps=300)
    say(f"fine-tuning {len(FINETUNED)} of its tensors for 1.1.0")
    v2 = finetune_checkpoint(v1, work / "checkpoints" / "1.1.0", tensors=FINETUNED)
    prompts = work / "eval-prompts.json"
    prompts.write_text(json.dumps(heldout_prompts()))
    results = {}
    for version, ckpt in (("1.0.0", v1), ("1.1.0", v2)):
        result = run_export(
            ExportSpec(
                checkpoint=ckpt,
                profile=load_profile("cpu-x86-int8"),
                version=version,
                model_name="demo-glm",
                out_dir=work / "hub" / version,
                key_path=key_path,
                eval_prompts=prompts,
            )
        )
        q = result.quality
        say(
            f"exported demo-glm@{version} for cpu-x86-int8: gate passed (top-1 {q.top1_agreement:.3f}, "
            f"greedy prefix {q.greedy_prefix_agreement:.3f}), {result.manifest.total_bytes():,} bytes, signed"
        )
        results[version] = result
    return results


def _answer(bundle: Path, prompt: str) -> str:
    """Greedy continuation of ``prompt`` by the exported graph (the agent's engine comes later)."""
    import numpy as np
    from tokenizers import Tokenizer

    from export.ort_runner import OrtDecoder

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    doc = json.loads((bundle / "manifest.json").read_text())
    ids = np.array([tok.encode(prompt).ids], np.int64)
    out = OrtDecoder(bundle / "model.onnx").greedy(ids, 24, set(doc["smoke_test"]["stop_tokens"]))
    text: str = tok.decode(out[0].tolist(), skip_special_tokens=True)
    return text.strip()


def _story(work: Path, say: Any) -> dict[str, Any]:
    from edgeglm.assembler import assemble_bundle
    from edgeglm.bundle import load_manifest, parse_manifest, verify_files
    from edgeglm.bundle_files import FolderSource, ingest_folder
    from edgeglm.errors import IntegrityError, ProtocolError
    from edgeglm.keys import create_keypair, load_public_keys
    from edgeglm.piece_store import PieceStore
    from edgeglm.planner import SourceChain, encode_step, plan, receive, step_frames
    from edgeglm.profiles import load_profile
    from edgeglm.protocol import Frame, FrameAssembler
    from edgeglm.tensor_delta import Encoded

    t0 = time.perf_counter()
    profile = load_profile("cpu-x86-int8")
    priv, pub, kid = create_keypair(work / "keys", "demo")
    trusted = load_public_keys([pub])
    say(f"signing key {kid} created in {work / 'keys'}")

    exports = _export_versions(work, priv, say)
    answer = _answer(work / "hub" / "1.0.0", SENSOR_PROMPT)
    say(f"demo-glm@1.0.0 answers {SENSOR_PROMPT!r} with {answer!r}")
    m_old, m_new = exports["1.0.0"].manifest, exports["1.1.0"].manifest
    doc_new = json.loads((work / "hub" / "1.1.0" / "manifest.json").read_text())

    # The device holds 1.0.0 (slot a) in its piece store.
    store = PieceStore(work / "device" / "pieces", durable=False)
    ingest_folder(work / "hub" / "1.0.0", m_old, store)

    # The hub plans what the device lacks, with real encoded costs.
    source = SourceChain(
        FolderSource.of(work / "hub" / "1.1.0", m_new), FolderSource.of(work / "hub" / "1.0.0", m_old)
    )
    the_plan = plan(m_new, [m_old], source=source, full_threshold=profile.chunk.full_threshold)
    say(f"plan: {the_plan.mode} mode, {the_plan.bytes_to_send:,} bytes to send")

    # The device verifies the manifest before anything else, then takes the pieces over the wire.
    manifest, doc = parse_manifest(json.dumps(doc_new), trusted)
    wire = _Wire()
    limit = profile.chunk.message_max_bytes
    for step in the_plan.steps():
        enc = encode_step(step, source)
        frames = step_frames(step, enc, limit)
        assembler = FrameAssembler()
        payload = None
        for frame in frames:
            packed = frame.pack()
            wire.frames += 1
            wire.bytes += len(packed)
            wire.largest = max(wire.largest, len(packed))
            payload = assembler.add(Frame.unpack(packed)) or payload
        assert payload is not None
        receive(store, step.piece_id, step.size, Encoded(enc.encoding, enc.width, payload), step.base_id)

    slot_b = assemble_bundle(manifest, doc, store, work / "device" / "slot-b")
    loaded, _ = load_manifest(slot_b, trusted)
    verify_files(loaded, slot_b)
    identical = all(
        (slot_b / f.path).read_bytes() == (work / "hub" / "1.1.0" / f.path).read_bytes() for f in m_new.files
    )
    say(f"device slot b assembled and verified; byte-identical to the hub's bundle: {identical}")

    # Tampering is refused: a flipped bit in a frame, a manifest edited after signing.
    some = the_plan.steps()[0]
    packed_first = step_frames(some, encode_step(some, source))[0].pack()
    flipped = bytearray(packed_first)
    flipped[-1] ^= 0x01
    try:
        Frame.unpack(bytes(flipped))
    except ProtocolError as exc:
        wire.rejected.append(f"flipped bit in a frame: {exc.why}")
    forged = json.loads(json.dumps(doc_new))
    forged["version"] = "1.1.1"
    try:
        parse_manifest(json.dumps(forged), trusted)
    except IntegrityError as exc:
        wire.rejected.append(f"edited manifest: {exc.why}")

    return {
        "key_id": kid,
        "quality": {v: r.quality.to_dict() for v, r in exports.items()},
        "prompt": SENSOR_PROMPT,
        "answer": answer,
        "old_version": m_old.version,
        "new_version": m_new.version,
        "new_bytes": m_new.total_bytes(),
        "full_compressed_bytes": the_plan.full_bytes,
        "bytes_to_send": the_plan.bytes_to_send,
        "wire_bytes": wire.bytes,
        "frames": wire.frames,
        "largest_frame": wire.largest,
        "message_limit": limit,
        "pieces": {k: sum(f.count(k) for f in the_plan.files) for k in ("have", "delta", "raw")},
        "identical": identical,
        "tampering_refused": wire.rejected,
        "seconds": round(time.perf_counter() - t0, 2),
        "still_to_come": STILL_TO_COME,
    }


def _table(r: dict[str, Any]) -> str:
    gates = " / ".join(
        f"{v}: top-1 {q['top1_agreement']:.3f}, KL {q['kl']:.4f}" for v, q in r["quality"].items()
    )
    rows = [
        ["export (cpu-x86-int8)", f"quality gate passed for both: {gates}"],
        ["sensor prompt", r["prompt"]],
        ["answer (exported graph)", r["answer"]],
        ["update", f"demo-glm {r['old_version']} -> {r['new_version']}"],
        ["new version size", f"{r['new_bytes']:,} bytes"],
        ["full download (compressed)", f"{r['full_compressed_bytes']:,} bytes"],
        [
            "sent (pieces, encoded)",
            f"{r['bytes_to_send']:,} bytes ({r['bytes_to_send'] / r['new_bytes']:.2%} of size)",
        ],
        [
            "on the wire (frames)",
            f"{r['wire_bytes']:,} bytes in {r['frames']} frames, largest {r['largest_frame']:,}",
        ],
        ["pieces have / delta / raw", " / ".join(str(r["pieces"][k]) for k in ("have", "delta", "raw"))],
        ["rebuilt byte-identical", "yes" if r["identical"] else "NO"],
        ["tampering refused", f"{len(r['tampering_refused'])} of 2"],
        ["seconds", r["seconds"]],
    ]
    lines = [render_table(["demo", "result"], rows), "", "Still to come (not faked here):"]
    lines += [f"  - {item}" for item in r["still_to_come"]]
    return "\n".join(lines)


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's files here instead of a temporary folder.",
)
@output_option
def demo(workdir: Path | None, output: str) -> None:
    """Run the EdgeGLM story that exists so far, for real, and print a summary table."""

    def say(line: str) -> None:
        if output == "table":
            click.echo(f"  {line}")

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        result = _story(workdir, say)
    else:
        with tempfile.TemporaryDirectory(prefix="edgeglm-demo-") as tmp:
            result = _story(Path(tmp), say)
    emit(result, output, _table)
    ok = result["identical"] and len(result["tampering_refused"]) == 2
    if not ok:
        raise click.ClickException("the demo did not end as it should (see the table)")
