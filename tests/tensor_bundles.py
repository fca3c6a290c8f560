"""Small signed bundles whose weights file has a tensor table (pieces per tensor slice, deltas)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def tensor_bundle(
    root: Path,
    key: Any,
    version: str,
    tweak: float,
    *,
    shape: tuple[int, int] = (256, 512),
    piece_bytes: int | None = None,
    model: str = "glm-tiny",
    profile: str = "cpu-x86-int4",
) -> Path:
    """``root/version``: tensors ``a`` (moved by ``tweak`` x noise, a fine-tune) and ``b`` (never
    changes) in ``model.onnx.data``, and a ``tokenizer.json`` that is the same in every version."""
    from edgeglm.bundle import Manifest, sign_manifest, write_manifest
    from edgeglm.bundle_files import describe_file
    from edgeglm.pieces import TensorSpan

    folder = root / version
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    if tweak:
        a = a + np.float32(tweak) * rng.standard_normal(shape).astype(np.float32)
    (folder / "model.onnx.data").write_bytes(a.tobytes() + b.tobytes())
    (folder / "tokenizer.json").write_text(json.dumps({"model": model}))  # the same in every version
    spans = [TensorSpan("a", "float32", 0, a.nbytes), TensorSpan("b", "float32", a.nbytes, b.nbytes)]
    sizing = {"piece_bytes": piece_bytes} if piece_bytes else {}
    files = (
        describe_file(folder / "model.onnx.data", "model.onnx.data", spans, **sizing),
        describe_file(folder / "tokenizer.json", "tokenizer.json"),
    )
    manifest = Manifest(model=model, version=version, profile=profile, files=files, quality={"passed": True})
    write_manifest(folder, sign_manifest(manifest, key))
    return folder
