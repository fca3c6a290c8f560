"""``edgectl demo``: the story so far, run for real on local files.

Today the demo covers the shared kernel: signing keys, two signed bundles (a base and a
fine-tune touching 10% of its tensors), the hub's update plan, every piece sent as binary wire
frames of at most 128 KiB, the device verifying signature, frames, pieces and files, and a
byte-identical new slot; then two tampering attempts that must be refused. It says what is still
to come rather than pretending: export of real GLM checkpoints, the agent, the hub and MQTT.
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
    "export of real GLM checkpoints to ONNX with the quality gate (issue 3)",
    "edge-agent inference over MQTT (issue 4)",
    "cloud-hub registry, rollouts and health gates (issue 5)",
    "OTA over MQTT with A/B slots and automatic rollback (issue 6)",
    "the whole story with three agents, waves and a revert (issue 7)",
]


@dataclass
class _Wire:
    frames: int = 0
    bytes: int = 0
    largest: int = 0
    rejected: list[str] = field(default_factory=list)


def _story(work: Path, say: Any) -> dict[str, Any]:
    from bench.synth_weights import Dims, base_model, make_pair, write_model
    from edgeglm.assembler import assemble_bundle
    from edgeglm.bundle import load_manifest, parse_manifest, verify_files
    from edgeglm.bundle_files import FolderSource, ingest_folder, seal_folder
    from edgeglm.errors import IntegrityError, ProtocolError
    from edgeglm.keys import create_keypair, load_private_key, load_public_keys
    from edgeglm.piece_store import PieceStore
    from edgeglm.planner import SourceChain, encode_step, plan, receive, step_frames
    from edgeglm.profiles import load_profile
    from edgeglm.protocol import Frame, FrameAssembler
    from edgeglm.tensor_delta import Encoded

    t0 = time.perf_counter()
    profile = load_profile("cpu-x86-int8")
    priv, pub, kid = create_keypair(work / "keys", "demo")
    key, trusted = load_private_key(priv), load_public_keys([pub])
    say(f"signing key {kid} created in {work / 'keys'}")

    dims = Dims(hidden=256, intermediate=768, kv=64, layers=8, vocab=4096)
    base = base_model(dims)
    bundles = {}
    for version, weights in (("1.0.0", base), ("1.1.0", make_pair(base, "A"))):
        folder = write_model(weights, work / "hub" / version)
        (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 64, "do_sample": False}))
        bundles[version] = seal_folder(
            folder,
            key,
            model="demo-glm",
            version=version,
            profile=profile.name,
            piece_bytes=profile.chunk.tensor_piece_bytes,
            cdc_avg_bytes=profile.chunk.cdc_avg_bytes,
        )
        say(f"bundle demo-glm@{version}: {bundles[version][0].total_bytes():,} bytes, signed")
    (m_old, _), (m_new, doc_new) = bundles["1.0.0"], bundles["1.1.0"]

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
    rows = [
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
