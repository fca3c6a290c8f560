"""The demo's three versions of one tiny GLM, made for real on this machine.

    1.0.0   a tiny GlmForCausalLM (GLM-Edge shape) trained on the shipped corpus, exported for
            ``cpu-x86-int8`` through the quality gate, signed
    1.1.0   a fine-tune of 1.0.0 touching two tensors, exported and gated the same way
    1.2.0   deliberately broken: 1.1.0's bundle with every norm weight zeroed *after* export (a bad
            hand patch), sealed again with 1.1.0's quality record and golden smoke test. Its
            signature is valid and the hub accepts it; only the smoke test on a device can tell
            that it no longer answers as its manifest says (the canary catches it).

Needs the export extra (torch, transformers); ``make demo`` installs it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeglm.errors import UnavailableError

MODEL = "demo-glm"
PROFILE = "cpu-x86-int8"
# The fine-tune of the demo: the last layer's MLP, as a small domain adaptation would.
FINETUNED = ("model.layers.1.mlp.gate_up_proj.weight", "model.layers.1.mlp.down_proj.weight")


@dataclass(frozen=True)
class Versions:
    folders: dict[str, Path]  # version -> bundle folder
    quality: dict[str, dict[str, Any]]  # version -> the gate's metrics (1.0.0, 1.1.0)
    public_key: Path
    key_id: str
    train_s: float
    export_s: float


def build_versions(work: Path, say: Callable[[str], None], *, steps: int = 300) -> Versions:
    import time

    try:
        from export.entry import (
            ExportSpec,
            build_checkpoint,
            finetune_checkpoint,
            heldout_prompts,
            run_export,
        )
    except ImportError as exc:
        raise UnavailableError(
            "demo", f"needs the export extra ({exc.name} is missing)", hint="Run it with 'make demo'."
        ) from exc
    from edgeglm.keys import create_keypair, load_private_key
    from edgeglm.profiles import load_profile

    private, public, kid = create_keypair(work / "keys", "demo-release")
    say(f"signing key {kid} created in {work / 'keys'}")
    t0 = time.perf_counter()
    say(f"training a tiny GLM (GlmForCausalLM, GLM-Edge shape) for {steps} steps on the shipped corpus")
    v1 = build_checkpoint(work / "checkpoints" / "1.0.0", "glm-edge", steps=steps)
    say(f"fine-tuning {len(FINETUNED)} of its tensors for 1.1.0")
    v11 = finetune_checkpoint(v1, work / "checkpoints" / "1.1.0", tensors=FINETUNED)
    train_s = time.perf_counter() - t0
    prompts = work / "eval-prompts.json"
    prompts.write_text(json.dumps(heldout_prompts()))
    folders: dict[str, Path] = {}
    quality: dict[str, dict[str, Any]] = {}
    t1 = time.perf_counter()
    for version, ckpt in (("1.0.0", v1), ("1.1.0", v11)):
        result = run_export(
            ExportSpec(
                checkpoint=ckpt,
                profile=load_profile(PROFILE),
                version=version,
                model_name=MODEL,
                out_dir=work / "bundles" / version,
                key_path=private,
                eval_prompts=prompts,
            )
        )
        q = result.quality
        say(
            f"exported {MODEL}@{version} for {PROFILE}: gate passed (top-1 {q.top1_agreement:.3f}, "
            f"greedy prefix {q.greedy_prefix_agreement:.3f}), {result.manifest.total_bytes():,} bytes, signed"
        )
        folders[version] = result.bundle
        quality[version] = q.to_dict()
    export_s = time.perf_counter() - t1
    folders["1.2.0"] = break_bundle(folders["1.1.0"], work / "bundles" / "1.2.0", load_private_key(private))
    say("made 1.2.0 deliberately broken: 1.1.0 with its norm weights zeroed after export, signed again")
    return Versions(folders, quality, public, kid, train_s, export_s)


def break_bundle(src: Path, dst: Path, key: Any, version: str = "1.2.0") -> Path:
    """``src`` with every norm weight of its external data zeroed, sealed as ``version`` with the
    source's quality, runtime and smoke-test records (which it no longer lives up to)."""
    import numpy as np

    from edgeglm.bundle import load_manifest
    from edgeglm.onnx_tensors import read_external_tables

    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    manifest, _ = load_manifest(src, None)
    zeroed = 0
    for rel, tensors in read_external_tables(dst).items():
        with open(dst / rel, "r+b") as fh:
            for t in tensors:
                if "norm" in t.name and t.dtype in ("float32", "float16"):
                    fh.seek(t.offset)
                    fh.write(np.zeros(t.length, np.uint8).tobytes())
                    zeroed += 1
    if not zeroed:
        raise RuntimeError(f"{src}: no norm tensor to break")
    reseal_as(manifest, dst, key, version)
    return dst


def reseal_as(source: Any, folder: Path, key: Any, version: str) -> None:
    """Sign ``folder`` as ``version`` of ``source``'s model and profile, carrying over its quality,
    runtime, smoke-test and source records (1 MiB tensor pieces, as exports cut them)."""
    from edgeglm.bundle_files import seal_folder

    seal_folder(
        folder,
        key,
        model=source.model,
        version=version,
        profile=source.profile,
        quality=source.quality,
        runtime=source.runtime,
        smoke_test=source.smoke_test.model_dump() if source.smoke_test else None,
        source_digest=source.source_digest,
        piece_bytes=1 << 20,
    )
